"""The one image reader of the inference face: the CLI's files, the demo's uploads and the pyfunc's
base64 rows all go through ``decode_image``, so a broken or hostile image fails alike everywhere, in
one line naming the file, upload or row."""
from __future__ import annotations

import io
import os
from pathlib import Path

from vlmpipe.core.errors import UserError


def decode_image(data: bytes, name: str, max_bytes: int | None = None, max_pixels: int | None = None):
    """An RGB PIL image from ``data`` (named ``name`` in errors), refusing more than ``max_bytes`` bytes
    or ``max_pixels`` pixels (checked from the header, before anything is decoded)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise UserError(f"{name}: empty, not an image")
    if max_bytes is not None and len(data) > max_bytes:
        raise UserError(f"{name}: {len(data) / 2**20:.1f} MiB; images up to {max_bytes // 2**20} MiB are taken")
    too_many = f"images up to {max_pixels / 1e6:.0f} megapixels are taken" if max_pixels else ""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise UserError(f"{name}: {w}×{h} pixels; {too_many}")
            im.load()
            return im.convert("RGB")
    except Image.DecompressionBombError:  # Pillow's own limit, met before ours when far over it
        raise UserError(f"{name}: far more pixels than {too_many or 'Pillow decodes'}") from None
    except UnidentifiedImageError:
        raise UserError(f"{name}: cannot read image (not an image file: use a PNG, JPEG, GIF, WebP …)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        # SyntaxError: how PIL reports some broken PNG headers; OSError, EOFError: truncated data.
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"{name}: cannot read image ({why}); is the file complete?") from None


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
