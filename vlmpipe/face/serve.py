"""``python -m vlmpipe serve``: a local web demo over the trained models.

One page (``vlmpipe/face/demo.html``): drop or upload an image, or pick a held-out one, read the
captioner's caption (beam search, the trained default), then ask the QA model or talk with the
chat model about it, turn after turn, with the image beside the dialogue.

Starlette + uvicorn, not Gradio: current Gradio releases cap Pillow below the version the rest of
the pipeline pins, and both servers are already in MLflow's dependency tree.

Models and their image encoders load once, at start. An image is decoded and featurised once per
encoder when it arrives; later turns reuse those features (a small LRU of recent images, keyed by
the hash of the image bytes). The history of a conversation lives in the page and is sent with
each message, so the server holds no per-user state beyond that cache. Model calls are serialised
by one lock: on a CPU two at once only slow each other down.

A bad upload (empty, not an image, truncated, too many pixels, too many bytes) is answered with a
one-line message the page shows; the server keeps serving.

HTTP API (JSON unless said otherwise):

    GET  /                      the page
    GET  /api/info              the loaded models and the held-out example ids
    GET  /api/example/{id}.png  a held-out image
    POST /api/image             body: the image file's bytes  -> {image, caption, width, height, seconds}
    POST /api/example/{id}      the same for a held-out image (+ its reference captions)
    POST /api/reply             {image, model: "chat"|"qa", message, history: [[q, a], ...]} -> {reply, seconds}
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import ipaddress
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from vlmpipe.core.errors import UserError
from vlmpipe.core.images import decode_image as decode_image_bytes

log = logging.getLogger("vlmpipe.face.serve")

PAGE = Path(__file__).with_name("demo.html")
MAX_UPLOAD_BYTES = 20 * 2**20
# Checked from the header, before decoding: a small PNG can claim 50000×50000 pixels and take
# gigabytes to decode.
MAX_PIXELS = 40_000_000
CACHE_IMAGES = 32
N_EXAMPLES = 12
MAX_MESSAGE_CHARS = 2000
DIALOGUE_MODELS = ("chat", "qa")


def decode_image(data: bytes):
    """An RGB PIL image from an upload's bytes, within the demo's limits, or a one-line ``UserError``."""
    return decode_image_bytes(data, "the upload", MAX_UPLOAD_BYTES, MAX_PIXELS)


@dataclass
class Demo:
    """The loaded models, their encoders, the held-out examples and the feature cache."""

    captioner: object | None
    dialogue: dict[str, object]                     # "chat" / "qa" -> a model with .answer()
    examples: object | None = None                  # CocoCaptions of the held-out split
    example_ids: list[int] = field(default_factory=list)
    _encoders: dict[str, Callable] = field(default_factory=dict)
    _cache: OrderedDict = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        from vlmpipe.face.api import featurizer

        # One encoder per distinct (encoder, weights, regions): the captioner and the chat model
        # continued from it share theirs.
        for m in self.models():
            key = self._encoder_key(m)
            if key not in self._encoders:
                self._encoders[key] = featurizer(m)

    def models(self) -> list:
        return [m for m in [self.captioner, *self.dialogue.values()] if m is not None]

    @staticmethod
    def _encoder_key(model) -> str:
        enc = model.config.encoder
        return f"{enc.get('name')}@{enc.get('hash')}/{model.config.regions}"

    def info(self) -> dict:
        return {"caption": self.captioner is not None,
                "dialogue": {k: m.TITLE for k, m in self.dialogue.items()},
                "examples": self.example_ids}

    def add_image(self, image) -> dict:
        """Featurise ``image`` for every encoder, caption it; returns the page's view of it."""
        # The pixels (and their shape), not the file: the same picture re-uploaded or picked again
        # hits the cache, with no re-encoding on the way to the model.
        digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
        digest.update(image.tobytes())
        token = digest.hexdigest()[:20]
        t0 = time.perf_counter()
        with self._lock, torch.no_grad():
            entry = self._cache.get(token)
            if entry is None:
                feats = {k: fn([image]).float().cpu() for k, fn in self._encoders.items()}
                entry = {"feats": feats, "caption": None}
                self._cache[token] = entry
                while len(self._cache) > CACHE_IMAGES:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(token)
            if self.captioner is not None and entry["caption"] is None:
                entry["caption"] = self.captioner.caption(entry["feats"][self._encoder_key(self.captioner)])[0]
        return {"image": token, "caption": entry["caption"], "width": image.width, "height": image.height,
                "seconds": round(time.perf_counter() - t0, 3)}

    def reply(self, token: str, model: str, message: str, history: list[tuple[str, str]]) -> dict:
        if model not in self.dialogue:
            loaded = ", ".join(self.dialogue) or "none"
            raise UserError(f"model: {model!r} is not loaded in this demo (loaded: {loaded})")
        if not message.strip():
            raise UserError("message: empty (ask something about the image)")
        if len(message) > MAX_MESSAGE_CHARS:
            raise UserError(f"message: {len(message)} characters; keep it under {MAX_MESSAGE_CHARS}")
        m = self.dialogue[model]
        t0 = time.perf_counter()
        with self._lock, torch.no_grad():
            entry = self._cache.get(token)
            if entry is None:
                raise UserError("this image is no longer in the demo's cache: upload it again")
            self._cache.move_to_end(token)
            text = m.answer(entry["feats"][self._encoder_key(m)], [message], [history])[0]
        return {"reply": text, "seconds": round(time.perf_counter() - t0, 3)}

    def example_image(self, image_id: int):
        if self.examples is None or image_id not in self.example_ids:
            raise UserError(f"example {image_id}: not one of the demo's held-out images")
        return self.examples.image(image_id)


def load_demo(captioner: str | None, qa: str | None, chat: str | None, coco: str | None,
              device: str = "auto") -> Demo:
    """Load what exists of the three models (at least one) and the held-out examples."""
    from vlmpipe.face.api import quiet_loading
    from vlmpipe.models.captioner import load_captioner
    from vlmpipe.models.chat_model import load_chat_model
    from vlmpipe.models.qa_model import load_qa_model

    def present(d: str | None, what: str) -> bool:
        if d and (Path(d) / "model.json").is_file():
            return True
        if d:
            log.warning("no %s at %s (train it with `dvc repro`); the demo goes on without it", what, d)
        return False

    with quiet_loading():
        cap = load_captioner(captioner, device) if present(captioner, "captioner") else None
        dialogue = {}
        if present(chat, "chat model"):
            dialogue["chat"] = load_chat_model(chat, device)
        if present(qa, "QA model"):
            dialogue["qa"] = load_qa_model(qa, device)
    if cap is None and not dialogue:
        raise UserError(f"no trained model found at {captioner}, {chat} or {qa}: run `dvc repro` first")

    examples, ids = None, []
    if coco and (Path(coco) / "val2017.zip").is_file():
        from vlmpipe.data.coco import CocoCaptions

        examples = CocoCaptions(coco, "val")
        ids = examples.ids[:N_EXAMPLES]
    return Demo(cap, dialogue, examples, ids)


def build_app(demo: Demo):
    """The Starlette app over ``demo``."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Route

    def error(msg: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": msg}, status_code=status)

    async def guarded(fn, *args):
        """Run a model call off the event loop; a user mistake is a 400 with its one line, a bug a
        500 with its one line (logged with its traceback). Either way the server keeps serving."""
        try:
            return JSONResponse(await run_in_threadpool(fn, *args))
        except UserError as e:
            return error(str(e))
        except Exception as e:  # noqa: BLE001 - one failed request must not take the demo down
            log.exception("request failed")
            return error(f"internal error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", 500)

    async def page(request: Request):
        return FileResponse(PAGE, media_type="text/html")

    async def info(request: Request):
        return JSONResponse(demo.info())

    async def upload(request: Request):
        n = int(request.headers.get("content-length") or 0)
        if n > MAX_UPLOAD_BYTES:  # refuse before reading the body
            return error(f"the upload is {n / 2**20:.1f} MiB; the demo takes images up to "
                         f"{MAX_UPLOAD_BYTES // 2**20} MiB", 413)
        data = await request.body()
        return await guarded(lambda: demo.add_image(decode_image(data)))

    def _example_id(request: Request) -> int:
        try:
            return int(request.path_params["image_id"])
        except ValueError:
            raise UserError(f"example {request.path_params['image_id']!r}: not an image id") from None

    async def example_png(request: Request):
        try:
            im = await run_in_threadpool(demo.example_image, _example_id(request))
        except UserError as e:
            return error(str(e), 404)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png")

    async def example_pick(request: Request):
        def pick():
            image_id = _example_id(request)
            out = demo.add_image(demo.example_image(image_id))
            return {**out, "references": demo.examples.captions(image_id)}
        return await guarded(pick)

    async def reply(request: Request):
        try:
            body = await request.json()
            token, model = str(body["image"]), str(body.get("model", "chat"))
            message, history = str(body["message"]), [(str(q), str(a)) for q, a in body.get("history", [])]
        except (ValueError, KeyError, TypeError):
            return error('expected JSON {"image", "model", "message", "history": [[question, answer], ...]}')
        return await guarded(demo.reply, token, model, message, history)

    return Starlette(routes=[
        Route("/", page),
        Route("/api/info", info),
        Route("/api/image", upload, methods=["POST"]),
        Route("/api/example/{image_id}.png", example_png),
        Route("/api/example/{image_id}", example_pick, methods=["POST"]),
        Route("/api/reply", reply, methods=["POST"]),
    ])


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); "
                        "pick another --port") from None


def serve(host: str = "127.0.0.1", port: int = 7860, captioner: str | None = "models/captioner",
          qa: str | None = "models/phi2_vlm", chat: str | None = "models/chat", coco: str | None = "data/coco",
          device: str = "auto") -> None:
    import uvicorn

    if not 0 <= port < 65536:
        raise UserError(f"--port: {port} is not a TCP port")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    _check_port_free(host, port)  # before minutes of model loading, not after
    t0 = time.perf_counter()
    demo = load_demo(captioner, qa, chat, coco, device)
    log.info("models loaded in %.1fs: %s", time.perf_counter() - t0,
             ", ".join(filter(None, ["captioner" if demo.captioner else "", *demo.dialogue])))
    if not loopback:
        log.warning("listening on %s: anyone who can reach this machine on port %d can use the demo", host, port)
    print(f"vlmpipe demo: http://{host}:{port}/  (Ctrl-C stops it)", flush=True)
    try:
        asyncio.run(uvicorn.Server(uvicorn.Config(build_app(demo), host=host, port=port,
                                                  log_level="warning")).serve())
    except KeyboardInterrupt:
        pass
