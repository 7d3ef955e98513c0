"""The one decoder of image bytes: the data stages' COCO members, the CLI's files, the demo's uploads
and the pyfunc's base64 rows all go through ``decode_image``, so a broken or hostile image fails alike
everywhere, in one line naming the file, member, upload or row."""
from __future__ import annotations

import io
import math

from vlmpipe.core.errors import UserError

# JPEG frame headers coded with Huffman tables (baseline, extended, progressive, lossless). Arithmetic
# coding can spend under a bit on a block, so no lower bound on the size of its data holds.
_HUFFMAN_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7}


def jpeg_cannot_hold(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the frame header of a Huffman-coded JPEG whose bytes cannot hold that many
    pixels, else None. Every 8×8 block of the full-resolution component has its DC coefficient coded in
    at least one bit, so a complete image has at least blocks / 8 bytes (flat images take about twice
    that). libjpeg decodes such a file without an error: what is missing comes out grey."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _HUFFMAN_FRAMES:
            if i + 9 > len(data):
                return None
            height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            blocks = math.ceil(width / 8) * math.ceil(height / 8)
            return (width, height) if len(data) * 8 < blocks else None
        if marker == 0xDA:  # a scan before any frame header: the decoder will say what is wrong
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def decode_image(data: bytes, name: str, max_bytes: int | None = None, max_pixels: int | None = None):
    """An RGB PIL image from ``data`` (named ``name`` in errors), refusing more than ``max_bytes`` bytes
    or ``max_pixels`` pixels (checked from the header, before anything is decoded)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise UserError(f"{name}: empty, not an image")
    if max_bytes is not None and len(data) > max_bytes:
        raise UserError(f"{name}: {len(data) / 2**20:.1f} MiB; images up to {max_bytes // 2**20} MiB are taken")
    claimed = jpeg_cannot_hold(data)
    if claimed is not None:
        raise UserError(f"{name}: truncated JPEG (its header says {claimed[0]}×{claimed[1]} pixels, which "
                        f"{len(data)} bytes cannot hold); is the file complete?")
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
