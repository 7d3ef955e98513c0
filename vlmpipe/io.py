"""Atomic writes: a killed stage never leaves a half-written file that looks valid.

Every output goes to a temporary name in the same directory first and is moved
into place with ``os.replace``, which is atomic on POSIX filesystems.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from vlmpipe.errors import UserError


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; move it onto ``dest`` on success.

    Works for files and directories alike: whatever the caller creates at the
    yielded path replaces ``dest`` only if the block finishes without error.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    target = tmp / dest.name
    try:
        yield target
        if dest.is_dir() and not dest.is_symlink():
            # os.replace cannot overwrite a non-empty directory: move the old one
            # aside first so the swap window is two renames, never a partial tree.
            old = tmp / (dest.name + ".old")
            os.replace(dest, old)
            os.replace(target, dest)
        else:
            os.replace(target, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(dest: str | os.PathLike, text: str) -> None:
    write_bytes(dest, text.encode("utf-8"))


def write_json(dest: str | os.PathLike, obj: Any) -> None:
    write_text(dest, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_image(path: str | os.PathLike):
    """An RGB PIL image, or a ``UserError`` naming the file (for the CLI's image arguments)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError, SyntaxError) as e:
        # SyntaxError: how PIL reports some broken PNG headers.
        raise UserError(f"{path}: cannot read image ({str(e).splitlines()[0][:200] or type(e).__name__})") from None
