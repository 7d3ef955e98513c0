"""The image files of the inference face (the CLI's), read through the one decoder of image bytes,
``vlmpipe.core.images.decode_image``, which the demo's uploads, the pyfunc's rows and the data
stages' COCO members go through too."""
from __future__ import annotations

import os
from pathlib import Path

from vlmpipe.core.errors import UserError
from vlmpipe.core.images import decode_image


def read_image(path: str | os.PathLike):
    """An RGB PIL image from the file ``path``, or a ``UserError`` naming it."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: a folder, not an image file")
    if not path.is_file():
        raise UserError(f"{path}: image file not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    return decode_image(data, str(path))
