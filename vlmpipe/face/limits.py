"""What the demo server takes, and how it reads a request within that.

Every request body is read as a stream and refused (413, one line) as soon as it passes its route's
limit, whatever Content-Length says; the bodies held at once share one budget (503 beyond it) and
must arrive within ``BODY_SECONDS``; JSON nested too deeply or malformed is a 400 line; a history is
bounded in turns and characters; an image in bytes and in pixels.
"""
from __future__ import annotations

import asyncio
import contextlib
import json

from vlmpipe.core.errors import UserError
from vlmpipe.core.images import decode_image as decode_image_bytes

MAX_UPLOAD_BYTES = 20 * 2**20
# Checked from the header, before decoding: a small PNG can claim 50000×50000 pixels and take
# gigabytes to decode.
MAX_PIXELS = 40_000_000
MAX_MESSAGE_CHARS = 2000
# The earlier turns sent with a message. A model reads only the last few hundred tokens of them
# (older turns are dropped), but every character is tokenized first, under the model lock: 100,000
# characters take about 0.05 s on a 2-core CPU; 8 MB took seconds and stalled every other user.
MAX_HISTORY_TURNS = 50
MAX_HISTORY_CHARS = 100_000
MAX_JSON_BYTES = 2**20            # a request body without an image (/api/reply, /api/example)
# /v1/chat/completions carries its image inline in base64 (4 characters per 3 bytes) beside the messages.
MAX_DATA_URI_CHARS = (MAX_UPLOAD_BYTES + 2) // 3 * 4 + 256
MAX_CHAT_BYTES = MAX_DATA_URI_CHARS + MAX_JSON_BYTES
# All request bodies held at once: a few full-size uploads; beyond it a request is told to retry.
MAX_BODIES_BYTES = 96 * 2**20
BODY_SECONDS = 120                # a body must arrive within this (a slow drip holds its share)
# Images decoded at once: a small PNG can decode to 40 megapixels (120 MB), so the count is bounded too.
DECODING = 2


def decode_image(data: bytes, name: str = "the upload"):
    """An RGB PIL image from an upload's bytes, within the demo's limits, or a one-line ``UserError``."""
    return decode_image_bytes(data, name, MAX_UPLOAD_BYTES, MAX_PIXELS)


def check_turn(message: str, history: list[tuple[str, str]]) -> None:
    """A message and its history within the demo's bounds, or a one-line ``UserError``."""
    if not message.strip():
        raise UserError("message: empty (ask something about the image)")
    if len(message) > MAX_MESSAGE_CHARS:
        raise UserError(f"message: {len(message)} characters; keep it under {MAX_MESSAGE_CHARS}")
    if len(history) > MAX_HISTORY_TURNS:
        raise UserError(f"history: {len(history)} earlier turns; the demo takes up to {MAX_HISTORY_TURNS} "
                        "(the models read only the last few; send fewer or start over)")
    chars = sum(len(q) + len(a) for q, a in history)
    if chars > MAX_HISTORY_CHARS:
        raise UserError(f"history: {chars} characters; the demo takes up to {MAX_HISTORY_CHARS} "
                        "(the models read only the last few turns; send fewer or start over)")


class Refused(Exception):
    """A request answered with ``status`` and one line, before or instead of a model call."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class Bodies:
    """Request bodies read as bounded streams, all of them together within one byte budget."""

    def __init__(self, budget: int = MAX_BODIES_BYTES) -> None:
        self.budget, self.held = budget, 0  # touched on the event loop only: no lock needed

    @contextlib.asynccontextmanager
    async def read(self, request, limit: int, what: str, noun: str = "requests"):
        """The body (bytes) while the block runs, counted in the budget until it ends;
        ``Refused`` (413) past ``limit`` bytes: reading stops at the first chunk over it."""
        from starlette.requests import ClientDisconnect

        size = f"{limit / 2**20:.1f}".rstrip("0").rstrip(".") + " MiB"
        too_big = f"{what} is over {size}; the demo takes {noun} up to {size}"
        claimed = request.headers.get("content-length", "")
        if claimed.isdigit() and int(claimed) > limit:  # refused before a byte is read
            raise Refused(413, too_big)
        # Chunks joined once at the end: a growing buffer would copy itself as it grows.
        chunks, held = [], 0
        try:
            try:
                async with asyncio.timeout(BODY_SECONDS):
                    async for chunk in request.stream():  # Content-Length may lie, or be absent (chunked)
                        if held + len(chunk) > limit:
                            raise Refused(413, too_big)
                        if self.held + len(chunk) > self.budget:
                            raise Refused(503, "the server is busy receiving other requests; try again in a moment")
                        chunks.append(chunk)
                        self.held += len(chunk)
                        held += len(chunk)
            except TimeoutError:
                raise Refused(408, f"{what} did not arrive within {BODY_SECONDS} s") from None
            except ClientDisconnect:
                raise Refused(400, "the client went away before sending the whole request") from None
            body = b"".join(chunks)
            chunks.clear()
            yield body
        finally:
            self.held -= held


def parse_json(data: bytes | bytearray, expected: str):
    """``json.loads`` that answers a bad body with one line: malformed, not UTF-8, or nested so deep
    that the parser recurses out of stack (100,000 ``[`` raise RecursionError, not ValueError)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise Refused(400, f"expected JSON {expected}: nested too deeply") from None
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both
        raise Refused(400, f"expected JSON {expected}") from None
