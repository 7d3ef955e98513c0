"""``python -m vlmpipe serve``: a local web demo over the trained models, and an OpenAI-compatible API.

One page (``vlmpipe/face/demo.html``): drop or upload an image, or pick a held-out one, read the
captioner's caption (beam search, the trained default), then ask the QA model or talk with the
chat model about it, turn after turn, with the image beside the dialogue.

Each model's held-out examples come from its own data, where the truth is known: the QA model's
from the test rows of the Q/A CSV (single CIFAR-style shapes, ``--qa-csv``/``--cifar``), the
captioner's and chat model's from the COCO val scenes (``--coco``) with their reference captions and
held-out conversations (``--conversations``). An example's known questions are offered on the page;
the answer to one is marked right or wrong here, by the evaluation's own rule
(``vlmpipe.scoring.metrics.vqa_accuracy``: normalised exact match). An upload has no truth and no mark.

The same dialogue models answer ``POST /v1/chat/completions`` in OpenAI's format, so the ``openai``
client (or anything that speaks to it) can talk to them: one image per conversation, sent inline as
a data URI.

Starlette + uvicorn, not Gradio: current Gradio releases cap Pillow below the version the rest of
the pipeline pins, and both servers are already in MLflow's dependency tree.

Models and their image encoders load once, at start. An image is decoded and featurised once per
encoder when it arrives; later turns reuse those features (a small LRU of recent images, keyed by
the hash of the pixels). The history of a conversation lives in the client and is sent with each
message, so the server holds no per-user state beyond that cache. Model calls are serialised by one
lock: on a CPU two at once only slow each other down.

It stays up under hostile requests: every request body is read as a stream and refused (413, one
line, connection closed) as soon as it passes its route's limit, whatever Content-Length says; the
bodies held at once share one budget (503 beyond it) and must arrive within ``BODY_SECONDS``;
JSON nested too deeply, malformed or of the wrong shape is a 400 line; a history is bounded in turns
and characters. No reply carries a traceback, a server path or an object's repr: a bug answers
"internal error (request <id>)", and the log holds the traceback under that id.

HTTP API (JSON unless said otherwise):

    GET  /                      the page
    GET  /health                {"status": "ok", "models": [...], "captioner": bool} (200 once loaded)
    GET  /api/info              the loaded models and the held-out example ids: "examples" (the scenes,
                                the captioner's and chat model's), "qa_examples" (the QA model's)
    GET  /api/example/{id}.png  a held-out image
    POST /api/image             body: the image file's bytes  -> {image, caption, width, height, seconds}
    POST /api/example/{id}      the same for a held-out image (a single shape is not captioned: the
                                captioner learnt scenes) + {kind: "scene"|"shape", references: [caption,
                                ...], questions: [its held-out questions, in order]}
    POST /api/reply             {image, model: "chat"|"qa", message, history: [[q, a], ...], example?: id}
                                -> {reply, seconds, expected, correct}: with "example" (the image is that
                                picked example), the held-out answer to the message and whether the reply
                                matches it; both null where no answer is known
    GET  /v1/models             the dialogue models, in OpenAI's list shape
    POST /v1/chat/completions   OpenAI's chat completions, streamed or not (docs/demo.md)

``/api/*`` errors are ``{"error": "one line"}``; ``/v1/*`` errors are OpenAI's
``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import ipaddress
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from vlmpipe.core.errors import UserError
from vlmpipe.face.examples import Example, scene_examples, scored, shape_examples
from vlmpipe.face.limits import (DECODING, MAX_CHAT_BYTES, MAX_JSON_BYTES, MAX_UPLOAD_BYTES, Bodies, Refused,
                                 check_turn, decode_image, parse_json)
from vlmpipe.face.openai_api import completion, completion_events, image_from_url, parse_chat_request

log = logging.getLogger("vlmpipe.face.serve")

PAGE = Path(__file__).with_name("demo.html")
CACHE_IMAGES = 32  # images whose features the demo keeps (an LRU)
DIALOGUE_MODELS = ("chat", "qa")


def prompt_ids(model, message: str, history: list[tuple[str, str]]) -> list[int]:
    """The prompt ``model.answer`` builds for ``message`` after ``history`` (the same template and
    token limit), for the OpenAI route, which needs the token counts and its own reply budget."""
    from vlmpipe.models.chat_model import CHAT, ChatModel
    from vlmpipe.models.qa_model import QA

    if isinstance(model, ChatModel):
        return CHAT.encode_prompt(model.tokenizer, message, history,
                                  max(model.window - int(model.config.max_new_tokens), 8))
    return QA.encode_prompt(model.tokenizer, message, history, model.config.max_prompt_tokens)


@dataclass
class Demo:
    """The loaded models, their encoders, the held-out examples and the feature cache."""

    captioner: object | None
    dialogue: dict[str, object]                     # "chat" / "qa" -> a model with .answer()
    examples: dict[str, Example] = field(default_factory=dict)   # by key; scenes first, then shapes
    loaded_at: int = field(default_factory=lambda: int(time.time()))
    _encoders: dict[str, Callable] = field(default_factory=dict)
    _cache: OrderedDict = field(default_factory=OrderedDict)
    _picked: dict[str, str] = field(default_factory=dict)   # example key -> its image's token, once picked
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _decoding: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(DECODING))

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
                "examples": [k for k, e in self.examples.items() if e.kind == "scene"],
                "qa_examples": [k for k, e in self.examples.items() if e.kind == "shape"]}

    def _features(self, image) -> tuple[str, dict]:
        """(token, cache entry) of ``image``, featurised now unless cached. The caller holds the lock."""
        # The pixels (and their shape), not the file: the same picture re-uploaded or picked again
        # hits the cache, with no re-encoding on the way to the model.
        digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
        digest.update(image.tobytes())
        token = digest.hexdigest()[:20]
        entry = self._cache.get(token)
        if entry is None:
            feats = {k: fn([image]).float().cpu() for k, fn in self._encoders.items()}
            entry = {"feats": feats, "caption": None}
            self._cache[token] = entry
            while len(self._cache) > CACHE_IMAGES:
                self._cache.popitem(last=False)
        self._cache.move_to_end(token)
        return token, entry

    def add_image(self, image, caption: bool = True) -> dict:
        """Featurise ``image`` for every encoder, caption it (unless ``caption`` is false); returns the
        page's view of it."""
        t0 = time.perf_counter()
        with self._lock, torch.no_grad():
            token, entry = self._features(image)
            if caption and self.captioner is not None and entry["caption"] is None:
                entry["caption"] = self.captioner.caption(entry["feats"][self._encoder_key(self.captioner)])[0]
        return {"image": token, "caption": entry["caption"] if caption else None,
                "width": image.width, "height": image.height,
                "seconds": round(time.perf_counter() - t0, 3)}

    def add_upload(self, data: bytes) -> dict:
        """``add_image`` of an upload's bytes; the decoded image counts among the ``DECODING`` held at once."""
        with self._decoding:
            return self.add_image(decode_image(data))

    def dialogue_model(self, model: str):
        if model not in self.dialogue:
            loaded = ", ".join(self.dialogue) or "none"
            raise UserError(f"model: {model!r} is not loaded in this demo (loaded: {loaded})")
        return self.dialogue[model]

    def reply(self, token: str, model: str, message: str, history: list[tuple[str, str]],
              example: str | None = None) -> dict:
        """The model's reply to ``message`` about the image ``token``; with ``example`` (the picked
        example that image is), the held-out answer and whether the reply matches it."""
        m = self.dialogue_model(model)
        check_turn(message, history)
        known = None
        if example is not None:
            ex = self.example(example)
            if self._picked.get(example) != token:
                raise UserError(f"example {example!r}: the image sent is not this example's; pick the example again")
            known = ex.known_answer(message, history)
        t0 = time.perf_counter()
        with self._lock, torch.no_grad():
            entry = self._cache.get(token)
            if entry is None:
                raise UserError("this image is no longer in the demo's cache: upload it again")
            self._cache.move_to_end(token)
            text = m.answer(entry["feats"][self._encoder_key(m)], [message], [history])[0]
        return {"reply": text, "seconds": round(time.perf_counter() - t0, 3),
                "expected": known[0] if known else None, "correct": scored(text, *known) if known else None}

    def complete(self, load_image: Callable, model: str, message: str, history: list[tuple[str, str]],
                 max_tokens: int | None = None) -> dict:
        """One reply for the OpenAI route about the image ``load_image()`` returns: the prompt ``answer``
        builds, greedy, within ``max_tokens`` new tokens (the end-of-reply token counted, as the model's
        own budget counts it; at most the model's budget, which its prompt limit leaves room for)
        -> text, token counts, finish reason."""
        m = self.dialogue_model(model)
        check_turn(message, history)
        budget = int(m.config.max_new_tokens)
        budget = min(max_tokens, budget) if max_tokens else budget
        with self._decoding:
            image = load_image()
            with self._lock, torch.no_grad():  # one lock span: the features cannot be evicted meanwhile
                _, entry = self._features(image)
                prompt = prompt_ids(m, message, history)
                ids = m.generate(entry["feats"][self._encoder_key(m)], [prompt], max_new_tokens=budget)[0]
        stopped = len(ids) < budget  # generate cuts at the end-of-reply token, which it does not return
        return {"text": m.decode(ids), "prompt_tokens": m.config.prefix_tokens + len(prompt),
                "completion_tokens": len(ids) + int(stopped), "finish_reason": "stop" if stopped else "length"}

    def example(self, key: str) -> Example:
        if key not in self.examples:
            raise UserError(f"example {key[:40]!r}: not one of the demo's held-out images")
        return self.examples[key]

    def pick(self, key: str) -> dict:
        """``add_image`` of held-out example ``key`` (a single shape uncaptioned: the captioner learnt
        scenes, and its caption of one would say nothing of it) + what the page shows of its truth. The
        answers stay here: a reply carries the one it is marked against."""
        ex = self.example(key)
        out = self.add_image(ex.image, caption=ex.kind == "scene")
        self._picked[key] = out["image"]
        return {**out, "kind": ex.kind, "references": ex.references, "questions": [q for q, _, _ in ex.turns]}


def load_demo(captioner: str | None, qa: str | None, chat: str | None, coco: str | None,
              device: str = "auto", *, cifar: str | None = None, qa_csv: str | None = None,
              conversations: str | None = None) -> Demo:
    """Load what exists of the three models (at least one) and each one's held-out examples."""
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

    has_cap, has_chat, has_qa = present(captioner, "captioner"), present(chat, "chat model"), present(qa, "QA model")
    if not (has_cap or has_chat or has_qa):
        raise UserError(f"no trained model found at {captioner}, {chat} or {qa}: run `dvc repro` first")
    # The examples before the models: a broken CSV is reported in seconds, not after the loading.
    examples = scene_examples(coco, conversations) if has_cap or has_chat else []
    examples += shape_examples(cifar, qa_csv) if has_qa else []
    with quiet_loading():
        cap = load_captioner(captioner, device) if has_cap else None
        dialogue = {}
        if has_chat:
            dialogue["chat"] = load_chat_model(chat, device)
        if has_qa:
            dialogue["qa"] = load_qa_model(qa, device)
    return Demo(cap, dialogue, {e.key: e for e in examples})


# ------------------------------------------------------------------ the app


def build_app(demo: Demo, bodies: Bodies | None = None):
    """The Starlette app over ``demo``."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    bodies = bodies or Bodies()

    def close_if_unread(status: int) -> dict:
        # Refused before the body was read whole: close the connection rather than read the rest.
        return {"Connection": "close"} if status in (408, 413, 503) else {}

    def api_error(msg: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": msg}, status_code=status, headers=close_if_unread(status))

    def openai_error(msg: str, status: int = 400, param: str | None = None, code: str | None = None) -> JSONResponse:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return JSONResponse({"error": {"message": msg, "type": kind, "param": param, "code": code}},
                            status_code=status, headers=close_if_unread(status))

    def handler(fn, shape: str = "api"):
        """``fn(request)`` with its errors answered in one line in the route's error shape: a refusal
        or a user mistake with its own line, a bug with "internal error" and a request id only (the
        traceback goes to the log under that id). Either way the server keeps serving."""
        async def run(request: Request):
            try:
                return await fn(request)
            except Refused as e:
                if shape == "openai":
                    return openai_error(e.message, e.status, e.param, e.code)
                return api_error(e.message, e.status)
            except UserError as e:
                return openai_error(str(e)) if shape == "openai" else api_error(str(e))
            except Exception:  # noqa: BLE001 - one failed request must not take the demo down
                rid = uuid.uuid4().hex[:8]
                log.exception("request %s (%s %s) failed", rid, request.method, request.url.path)
                msg = f"internal error (request {rid}; the server's log has the details)"
                return openai_error(msg, 500) if shape == "openai" else api_error(msg, 500)
        return run

    async def page(request: Request):
        return FileResponse(PAGE, media_type="text/html")

    async def health(request: Request):
        return JSONResponse({"status": "ok", "models": list(demo.dialogue), "captioner": demo.captioner is not None})

    async def info(request: Request):
        return JSONResponse(demo.info())

    async def upload(request: Request):
        async with bodies.read(request, MAX_UPLOAD_BYTES, "the upload", "images") as data:
            return JSONResponse(await run_in_threadpool(demo.add_upload, data))

    async def example_png(request: Request):
        try:
            im = demo.example(request.path_params["image_id"]).image
        except UserError as e:
            return api_error(str(e), 404)
        buf = io.BytesIO()
        await run_in_threadpool(im.save, buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png")

    async def example_pick(request: Request):
        async with bodies.read(request, MAX_JSON_BYTES, "the request body"):  # none expected: bounded anyway
            return JSONResponse(await run_in_threadpool(demo.pick, request.path_params["image_id"]))

    async def reply(request: Request):
        expected = '{"image", "model", "message", "history": [[question, answer], ...], "example"?}'
        async with bodies.read(request, MAX_JSON_BYTES, "the request body") as data:
            body = parse_json(data, expected)
        try:
            token, model, message = body["image"], body.get("model", "chat"), body["message"]
            history, example = body.get("history", []), body.get("example")
            if not all(isinstance(v, str) for v in (token, model, message)) or not isinstance(history, list):
                raise TypeError
            if not all(isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in history):
                raise TypeError
            if example is not None and not isinstance(example, str):
                raise TypeError
            history = [(q, a) for q, a in history]
        except (KeyError, TypeError):
            raise Refused(400, f"expected JSON {expected}") from None
        return JSONResponse(await run_in_threadpool(demo.reply, token, model, message, history, example))

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": demo.loaded_at, "owned_by": "vlmpipe"}
            for name in demo.dialogue]})

    async def chat_completions(request: Request):
        # The body stays counted in the budget until the reply: the parsed request holds as much.
        async with bodies.read(request, MAX_CHAT_BYTES, "the request body") as data:
            # Off the event loop: a body of tens of MB takes a moment to parse, and the image to decode.
            req = parse_chat_request(await run_in_threadpool(parse_json, data, '{"model", "messages", ...}'),
                                     demo.dialogue)
            out = await run_in_threadpool(demo.complete, lambda: image_from_url(req.image_url, req.image_at),
                                          req.model, req.message, req.history, req.max_tokens)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:  # errors are answered above, before the stream starts, as plain OpenAI errors
            return StreamingResponse(completion_events(out, req, cid, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(completion(out, req, cid, created))

    async def unexpected(request: Request, exc: Exception):
        # The last resort, for an error outside every handler: still no traceback to the client.
        return JSONResponse({"error": "internal error"}, status_code=500)

    return Starlette(routes=[
        Route("/", page),
        Route("/health", health),
        Route("/api/info", info),
        Route("/api/image", handler(upload), methods=["POST"]),
        Route("/api/example/{image_id}.png", example_png),
        Route("/api/example/{image_id}", handler(example_pick), methods=["POST"]),
        Route("/api/reply", handler(reply), methods=["POST"]),
        Route("/v1/models", models),
        Route("/v1/chat/completions", handler(chat_completions, "openai"), methods=["POST"]),
    ], exception_handlers={Exception: unexpected})


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
          device: str = "auto", cifar: str | None = "data/cifar", qa_csv: str | None = "data/cifar_qa.csv",
          conversations: str | None = "data/conversations") -> None:
    import uvicorn

    if not 0 <= port < 65536:
        raise UserError(f"--port: {port} is not a TCP port")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    _check_port_free(host, port)  # before minutes of model loading, not after
    t0 = time.perf_counter()
    demo = load_demo(captioner, qa, chat, coco, device, cifar=cifar, qa_csv=qa_csv, conversations=conversations)
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
