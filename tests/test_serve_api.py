"""``python -m vlmpipe serve``'s OpenAI-compatible route (``/v1/chat/completions``, ``/v1/models``,
``/health``) through the official ``openai`` client, and the server's limits under hostile requests.

The served models are tiny and untrained (``tests/untrained.py``): the point is that the route answers
exactly as the Python API does for the same image and history, and that the server stays up and
small, not that the answers are right. Fast tests drive the ASGI app in-process with a stand-in
demo; the slow ones run one real server subprocess for the module (its RSS is read from /proc).
"""
from __future__ import annotations

import asyncio
import base64
import http.client
import json
import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

import servers
import untrained
from vlmpipe.face import limits, openai_api, serve
from vlmpipe.core.errors import UserError

QUESTIONS = ["what colour is the circle?", "is it red?"]
MiB = 2**20


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def user(text: str, image: str | None = None) -> dict:
    parts = [{"type": "text", "text": text}]
    if image is not None:
        parts.append({"type": "image_url", "image_url": {"url": image}})
    return {"role": "user", "content": parts}


# ------------------------------------------------------------------ in-process (fast)


class StandIn:
    """What ``build_app`` calls of a ``Demo``, with no model: ``complete`` echoes or raises ``bug``."""

    dialogue, captioner, examples, loaded_at = {"chat": None}, None, None, 0

    def __init__(self, bug: Exception | None = None) -> None:
        self.bug, self.calls = bug, []

    def info(self) -> dict:
        return {"caption": False, "dialogue": {"chat": "chat model"}, "examples": []}

    def add_upload(self, data) -> dict:
        raise self.bug or AssertionError("not reached")

    def complete(self, load_image, model, message, history, max_tokens=None) -> dict:
        self.calls.append((message, history, max_tokens))
        if self.bug:
            raise self.bug
        return {"text": f"you said {message}", "prompt_tokens": 3, "completion_tokens": 2, "finish_reason": "stop"}


def asgi(app, method: str, path: str, chunks=(b"",), headers=()) -> tuple[int, dict, bytes, int]:
    """One request to the ASGI ``app``: (status, headers, body, how many body chunks it read)."""
    chunks = iter(chunks)
    read, sent, ahead = [0], [], [next(chunks, None)]

    async def receive():
        chunk, ahead[0] = ahead[0], next(chunks, None)
        if chunk is None:
            return {"type": "http.disconnect"}
        read[0] += 1
        return {"type": "http.request", "body": chunk, "more_body": ahead[0] is not None}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body, read[0]


def endless(size: int = MiB):
    while True:
        yield b"\0" * size


def test_a_body_is_read_only_up_to_its_limit_whatever_it_claims():
    app = serve.build_app(StandIn())
    # Chunked (no Content-Length), endless: refused after the first chunk over 20 MiB, connection closed.
    status, headers, body, read = asgi(app, "POST", "/api/image", endless())
    assert status == 413 and headers.get("connection") == "close"
    assert json.loads(body) == {"error": "the upload is over 20 MiB; the demo takes images up to 20 MiB"}
    assert read == limits.MAX_UPLOAD_BYTES // MiB + 1
    # A Content-Length over the limit: refused before a byte is read.
    status, _, body, read = asgi(app, "POST", "/v1/chat/completions", endless(),
                                 headers=[("Content-Length", str(300 * MiB))])
    assert status == 413 and read == 0
    assert "is over 27.7 MiB" in json.loads(body)["error"]["message"]
    # A Content-Length that understates: counted all the same.
    status, _, _, read = asgi(app, "POST", "/api/reply", endless(64 * 1024), headers=[("Content-Length", "10")])
    assert status == 413 and read == limits.MAX_JSON_BYTES // (64 * 1024) + 1


def test_bodies_held_at_once_share_one_budget():
    bodies = limits.Bodies(budget=3 * MiB)
    bodies.held = 2 * MiB  # as if other requests were being read
    status, headers, body, _ = asgi(serve.build_app(StandIn(), bodies), "POST", "/api/image", endless())
    assert status == 503 and "try again" in json.loads(body)["error"] and headers.get("connection") == "close"
    assert bodies.held == 2 * MiB  # what this request held is given back


@pytest.mark.parametrize("path, text", [("/api/reply", b"[" * 100_000), ("/v1/chat/completions", b"[" * 100_000),
                                        ("/api/reply", b"{not json"), ("/v1/chat/completions", b"\xff\xfe{")],
                         ids=["deep-api", "deep-openai", "malformed-api", "not-utf8-openai"])
def test_deep_or_malformed_json_is_one_line(path, text):
    status, _, body, _ = asgi(serve.build_app(StandIn()), "POST", path, [text])
    error = json.loads(body)["error"]
    message = error if isinstance(error, str) else error["message"]
    assert status == 400 and message.startswith("expected JSON") and "\n" not in message
    assert ("nested too deeply" in message) == text.startswith(b"[")


def test_a_bug_reaches_the_client_as_internal_error_and_a_request_id_only(caplog):
    secret = "/home/someone/vlmpipe/models/chat/lm"
    app = serve.build_app(StandIn(bug=RuntimeError(f"cannot open {secret}: {object()!r}")))
    request = {"model": "chat", "messages": [user("hi", "data:image/png;base64,AAAA")]}
    with caplog.at_level(logging.ERROR, logger="vlmpipe.face.serve"):
        status, _, body, _ = asgi(app, "POST", "/v1/chat/completions", [json.dumps(request).encode()])
        api_status, _, api_body, _ = asgi(app, "POST", "/api/image", [b"\x89PNG"])
    message = json.loads(body)["error"]["message"]
    assert status == 500 and api_status == 500 and message.startswith("internal error (request ")
    assert json.loads(api_body)["error"].startswith("internal error (request ")
    for text in (body, api_body):
        assert b"/home" not in text and b"object at" not in text and b"RuntimeError" not in text
    rid = message.split("request ")[1][:8]
    # The log keeps what the client does not see, under the same id.
    logged = [r for r in caplog.records if rid in r.getMessage()]
    assert logged and secret in str(logged[0].exc_info[1])


@pytest.mark.parametrize("change, says", [
    ({"model": "gpt-4o"}, "'gpt-4o' is not loaded here (loaded: chat)"),
    ({"messages": [user("what is it?")]}, "messages: no image"),
    ({"messages": [user("a", "data:image/png;base64,AAAA"), user("b", "data:image/png;base64,AAAA")]},
     "taking turns"),
    ({"messages": [user("a", "data:image/png;base64,AAAA"), {"role": "assistant", "content": "b"},
                   user("c", "data:image/png;base64,AAAA")]}, "2 images"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role: 'tool' is not taken"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
     "messages[0].content[0]: 'input_audio' is not taken in a user message"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"n": 3}, "n: only one choice"),
])
def test_a_request_the_route_cannot_answer_is_refused_in_one_line(change, says):
    request = {"model": "chat", "messages": [user("what is it?", "data:image/png;base64,AAAA")], **change}
    with pytest.raises(limits.Refused) as e:
        openai_api.parse_chat_request(request, {"chat": None})
    assert says in e.value.message and "\n" not in e.value.message
    assert e.value.status == (404 if "model" in change else 400)


def test_a_conversation_maps_to_history_and_question_with_system_prompts_ignored():
    req = openai_api.parse_chat_request({"model": "chat", "max_tokens": 5, "temperature": 0.7, "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        user("what is it?", "data:image/png;base64,AAAA"),
        {"role": "assistant", "content": [{"type": "text", "text": "a circle"}]},
        {"role": "user", "content": "what colour?"}]}, {"chat": None})
    assert (req.message, req.history, req.max_tokens) == ("what colour?", [("what is it?", "a circle")], 5)
    assert req.image_at == "messages[1].content[1].image_url"


@pytest.mark.parametrize("url, status, says", [
    ("https://example.com/cat.png", 400, "remote image URLs are not fetched"),
    ("data:image/png,rawbytes", 400, "only base64 data URIs"),
    ("data:image/png;base64,!!!!", 400, "not valid base64"),
    ("data:image/png;base64," + "A" * (limits.MAX_DATA_URI_CHARS + 4), 413, "over 20 MiB"),
    ("data:image/png;base64," + base64.b64encode(b"hello").decode(), 400, "cannot read image"),
], ids=["remote", "not-base64-uri", "bad-base64", "too-big", "not-an-image"])
def test_an_image_url_is_a_bounded_data_uri(url, status, says):
    with pytest.raises((limits.Refused, UserError)) as e:
        openai_api.image_from_url(url, "messages[0].content[1].image_url")
    message = str(e.value)
    assert says in message and message.startswith("messages[0].content[1].image_url")
    assert getattr(e.value, "status", 400) == status


# ------------------------------------------------------------------ a real server (slow)


@dataclass
class Server:
    url: str
    port: int
    pid: int
    root: Path
    images: list[Path]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``python -m vlmpipe serve`` over tiny untrained models, on a free loopback port."""
    root, images = untrained.build(tmp_path_factory.mktemp("serve_api"))
    port = servers.free_port()
    url = f"http://127.0.0.1:{port}"
    m = root / "models"
    cmd = [sys.executable, "-m", "vlmpipe", "serve", "--port", str(port), "--coco", "none",
           "--captioner", str(m / "captioner"), "--qa", str(m / "phi2_vlm"), "--chat", str(m / "chat")]
    with servers.background(cmd, log_path=root / "serve.log", ready=lambda: servers.http_ok(url + "/health"),
                            timeout=180, env=servers.clean_env(), cwd=root, name="vlmpipe serve") as proc:
        yield Server(url, port, proc.pid, root, images)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(server):
    """What the Python API answers about image 0: each model's replies to QUESTIONS, turn after turn."""
    from vlmpipe.face import api
    from vlmpipe.face.images import read_image

    out = {}
    for name, folder in (("chat", "chat"), ("qa", "phi2_vlm")):
        conv = api.Conversation(api.load_dialogue_model(str(server.root / "models" / folder)),
                                read_image(server.images[0]))
        out[name] = [conv.say(q) for q in QUESTIONS]
    return out


def get(url: str) -> tuple[int, dict]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, json.loads(r.read())


def still_serving(server: Server, client) -> None:
    assert get(server.url + "/health") == (200, {"status": "ok", "models": ["chat", "qa"], "captioner": True})
    out = client.chat.completions.create(model="chat", messages=[user(QUESTIONS[0], data_uri(server.images[1]))])
    assert out.choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow  # a server subprocess
def test_health_and_models_list_what_is_loaded(server, client):
    assert get(server.url + "/health")[0] == 200
    assert [m.id for m in client.models.list()] == ["chat", "qa"]


@pytest.mark.slow  # a server subprocess
@pytest.mark.parametrize("model", ["chat", "qa"])
def test_a_conversation_through_the_openai_client_answers_as_the_python_api(server, client, reference, model):
    image = data_uri(server.images[0])
    first = client.chat.completions.create(model=model, messages=[user(QUESTIONS[0], image)])
    assert first.object == "chat.completion" and first.model == model
    assert first.choices[0].message.role == "assistant"
    assert first.choices[0].message.content == reference[model][0]
    # The follow-up carries the first turn as history; a system prompt is ignored.
    messages = [{"role": "system", "content": "Answer briefly."}, user(QUESTIONS[0], image),
                {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": QUESTIONS[1]}]
    second = client.chat.completions.create(model=model, messages=messages, temperature=0.7)
    assert second.choices[0].message.content == reference[model][1]
    usage, budget = second.usage, {"chat": 6, "qa": 4}[model]  # the models' max_new_tokens (untrained.py)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens == budget if second.choices[0].finish_reason == "length" else \
        usage.completion_tokens <= budget


@pytest.mark.slow  # a server subprocess
def test_a_streamed_reply_is_the_reply_in_pieces(server, client):
    messages = [user(QUESTIONS[0], data_uri(server.images[0]))]
    whole = client.chat.completions.create(model="chat", messages=messages)
    chunks = list(client.chat.completions.create(model="chat", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.slow  # a server subprocess
def test_max_tokens_bounds_the_reply(server, client):
    messages = [user(QUESTIONS[0], data_uri(server.images[0]))]
    whole = client.chat.completions.create(model="chat", messages=messages)
    short = client.chat.completions.create(model="chat", messages=messages, max_tokens=2)
    assert short.usage.completion_tokens <= 2 and whole.choices[0].message.content.startswith(
        short.choices[0].message.content)
    # More than the model's own budget: capped at it.
    long = client.chat.completions.create(model="chat", messages=messages, max_tokens=10_000)
    assert long.choices[0].message.content == whole.choices[0].message.content


@pytest.mark.slow  # a server subprocess
@pytest.mark.parametrize("kwargs, error, says", [
    ({"model": "gpt-4o"}, openai.NotFoundError, "model: 'gpt-4o' is not loaded here (loaded: chat, qa)"),
    ({"messages": [user("what is it?")]}, openai.BadRequestError, "messages: no image"),
    ({"messages": [user("what is it?", "http://127.0.0.1:1/cat.png")]}, openai.BadRequestError,
     "remote image URLs are not fetched"),
    ({"messages": [user("what is it?", "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n").decode())]},
     openai.BadRequestError, "messages[0].content[1].image_url: cannot read image"),
])
def test_a_refused_request_raises_the_clients_error_with_one_line(server, client, kwargs, error, says):
    request = {"model": "chat", "messages": [user("what is it?", data_uri(server.images[0]))], **kwargs}
    with pytest.raises(error) as e:
        client.chat.completions.create(**request)
    message = e.value.body["message"]
    assert says in message and "\n" not in message and str(server.root) not in message


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _chunked_upload(port: int, path: str, total: int, out: dict, key) -> None:
    """POST ``total`` bytes to ``path`` in 1 MiB chunks (no Content-Length); out[key] = (status, body,
    bytes sent). The server may close mid-upload: its answer is read after the send fails."""
    sent = [0]

    def chunks():
        while sent[0] < total:
            sent[0] += MiB
            yield b"\0" * MiB

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        try:
            conn.request("POST", path, body=chunks(), encode_chunked=True,
                         headers={"Content-Type": "application/octet-stream"})
        except OSError:  # the server closed after refusing: its answer is already here
            pass
        r = conn.getresponse()
        out[key] = (r.status, r.read(), sent[0])
    finally:
        conn.close()


@pytest.mark.slow  # a server subprocess
@pytest.mark.parametrize("path, limit", [("/api/image", limits.MAX_UPLOAD_BYTES),
                                         ("/v1/chat/completions", limits.MAX_CHAT_BYTES)], ids=["page-upload", "openai"])
def test_three_concurrent_200_mb_chunked_uploads_are_refused_early_and_memory_stays_flat(server, client, path, limit):
    before = _rss_kib(server.pid)
    Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # restart the peak (VmHWM) from now
    out: dict = {}
    t0 = time.perf_counter()
    threads = [threading.Thread(target=_chunked_upload, args=(server.port, path, 200 * MiB, out, i)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    seconds = time.perf_counter() - t0
    peak = _rss_kib(server.pid, "VmHWM")
    assert len(out) == 3 and seconds < 60
    for status, body, sent in out.values():
        error = json.loads(body)["error"]
        assert status == 413 and "is over" in (error if isinstance(error, str) else error["message"])
        assert sent < limit + 40 * MiB  # refused near the limit (plus what the socket buffers took), not 200 MB
    # Three bodies near the limit, each with its growing buffer's copy, and no more; unbounded,
    # the three would take 600 MB.
    grew = (peak - before) / 1024
    print(f"{path}: peak RSS {peak / 1024:.0f} MiB, {grew:+.0f} MiB over {before / 1024:.0f} MiB, {seconds:.2f}s")
    assert grew < 3 * 1.5 * limit / MiB + 64
    still_serving(server, client)


def _raw(port: int, request: bytes, timeout: float = 10) -> tuple[int, bytes]:
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(request)
        except OSError:  # refused and closed mid-body: the answer is already here
            pass
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:  # the close after the answer, with our body unread
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.slow  # a server subprocess
def test_a_claimed_length_over_the_limit_is_refused_before_the_body(server, client):
    t0 = time.perf_counter()
    status, body = _raw(server.port, b"POST /api/image HTTP/1.1\r\nHost: x\r\nContent-Length: 300000000\r\n\r\n")
    assert status == 413 and b"is over 20 MiB" in body and time.perf_counter() - t0 < 5
    still_serving(server, client)


@pytest.mark.slow  # a server subprocess
@pytest.mark.parametrize("path, body, says", [
    ("/api/reply", b"[" * 100_000, "nested too deeply"),
    ("/v1/chat/completions", b"[" * 100_000, "nested too deeply"),
    ("/api/reply", b"{not json", "expected JSON"),
    ("/api/reply", json.dumps({"image": "0" * 20, "message": "hi", "history": [["q", "a"]] * 51}).encode(),
     "history: 51 earlier turns"),
    ("/api/reply", json.dumps({"image": "0" * 20, "message": "hi", "history": [["q" * 2000, "a"]] * 50}).encode(),
     "history: 100050 characters"),
    ("/api/reply", b" " * (2 * MiB), "is over 1 MiB"),
], ids=["deep-api", "deep-openai", "malformed", "history-turns", "history-chars", "body-over-limit"])
def test_hostile_json_is_one_line_and_the_server_stays_up(server, client, path, body, says):
    status, answer = _raw(server.port, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                       f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    error = json.loads(answer)["error"]
    message = error if isinstance(error, str) else error["message"]
    assert status in (400, 413) and says in message and "\n" not in message and "Traceback" not in message
    still_serving(server, client)


@pytest.mark.slow  # a server subprocess
def test_a_long_history_through_the_openai_route_is_refused(server, client):
    messages = [user("q", data_uri(server.images[0]))]
    for _ in range(51):
        messages += [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="chat", messages=messages)
    assert "history: 51 earlier turns" in e.value.body["message"]
