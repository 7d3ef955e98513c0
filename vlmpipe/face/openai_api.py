"""``POST /v1/chat/completions`` in OpenAI's format: the request mapped to one image, a history and a
question (or a one-line refusal), and the reply shaped as a ``chat.completion`` or as its server-sent
``chat.completion.chunk`` events. The serving itself is ``vlmpipe.face.serve``'s."""
from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass

from vlmpipe.face.limits import (MAX_DATA_URI_CHARS, MAX_HISTORY_TURNS, MAX_UPLOAD_BYTES, Refused,
                                 decode_image)

OPENAI_ROLES = ("system", "developer", "user", "assistant")
WORDS = re.compile(r"\S+\s*|\s+")  # a reply in pieces whose concatenation is the reply


@dataclass
class ChatRequest:
    model: str
    image_url: str
    image_at: str          # where in the request the image is: messages[i].content[j].image_url
    message: str
    history: list[tuple[str, str]]
    max_tokens: int | None
    stream: bool
    include_usage: bool


def text_of(content, at: str, role: str, images: list) -> str:
    """A message's text; its image parts appended to ``images`` as (url, where)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Refused(400, f"{at}.content: expected a string or a list of content parts", at + ".content")
    texts = []
    for j, part in enumerate(content):
        where = f"{at}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and role == "user":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise Refused(400, f"{where}.image_url.url: expected a data URI string", where)
            images.append((url, f"{where}.image_url"))
        else:
            what = repr(kind)[:40] if isinstance(kind, str) else "a part without a type"
            allowed = "text and image_url" if role == "user" else "text"
            raise Refused(400, f"{where}: {what} is not taken in a {role} message ({allowed} parts are)", where)
    return " ".join(texts)


def parse_chat_request(body, loaded: dict) -> ChatRequest:
    """The OpenAI request ``body`` mapped to one image, a history and a question, or ``Refused``."""
    if not isinstance(body, dict):
        raise Refused(400, 'expected a JSON object {"model", "messages", ...}')
    model = body.get("model")
    if not isinstance(model, str):
        raise Refused(400, f"model: expected one of {', '.join(loaded) or 'none'}", "model")
    if model not in loaded:
        raise Refused(404, f"model: {model[:100]!r} is not loaded here (loaded: {', '.join(loaded) or 'none'})",
                      "model", "model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Refused(400, "messages: expected a non-empty list of {role, content}", "messages")
    if len(messages) > 2 * MAX_HISTORY_TURNS + 10:  # the turn bound below, with room for system messages
        raise Refused(400, f"messages: {len(messages)}; the demo takes up to {MAX_HISTORY_TURNS} earlier turns",
                      "messages")
    turns, images = [], []
    for i, msg in enumerate(messages):
        at = f"messages[{i}]"
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in OPENAI_ROLES:
            what = repr(role)[:40] if isinstance(role, str) else "no role"
            raise Refused(400, f"{at}.role: {what} is not taken (system, user, assistant)", at + ".role")
        text = text_of(msg.get("content"), at, role, images)
        if role in ("user", "assistant"):  # system prompts are ignored: the models were trained without one
            turns.append((role, text))
    roles = [r for r, _ in turns]
    if roles != [("user", "assistant")[k % 2] for k in range(len(roles))] or roles[-1:] != ["user"]:
        raise Refused(400, "messages: expected user and assistant messages taking turns, ending with a user "
                           "message", "messages")
    if len(images) != 1:
        raise Refused(400, "messages: no image; put one image_url part (a data:image/...;base64 URI) in a user "
                           "message" if not images else
                      f"messages: {len(images)} images; a conversation here is about exactly one image", "messages")

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise Refused(400, "max_tokens: expected a whole number >= 1", "max_tokens")
    temperature = body.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
                                    or not 0 <= temperature <= 2):
        raise Refused(400, "temperature: expected a number from 0 to 2 (the models decode greedily whatever it is)",
                      "temperature")
    if body.get("n") not in (None, 1):
        raise Refused(400, "n: only one choice per request (decoding is greedy: more would be copies)", "n")
    stream = body.get("stream") or False
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise Refused(400, "stream: expected true or false (stream_options: an object)", "stream")
    texts = [t for _, t in turns]
    return ChatRequest(model, images[0][0], images[0][1], texts[-1], list(zip(texts[0:-1:2], texts[1:-1:2])),
                       max_tokens, stream, bool(options.get("include_usage")))


def image_from_url(url: str, at: str):
    """The image of a data URI, through the uploads' decoder and limits. Remote URLs are not fetched:
    the server would reach out wherever a client points it, and wait on it."""
    if re.match(r"https?://", url, re.IGNORECASE):
        raise Refused(400, f"{at}: remote image URLs are not fetched by this server; send the image inline as "
                           "a data URI (data:image/png;base64,...)", at, "remote_image_refused")
    head, comma, payload = url.partition(",")
    if not head.lower().startswith("data:") or not comma:
        raise Refused(400, f"{at}: expected a data URI (data:image/png;base64,...)", at)
    if not head.lower().endswith(";base64"):
        raise Refused(400, f"{at}: only base64 data URIs are read (data:image/png;base64,...)", at)
    if len(payload) > MAX_DATA_URI_CHARS:
        raise Refused(413, f"{at}: the image is over {MAX_UPLOAD_BYTES // 2**20} MiB; the demo takes images up to "
                           f"{MAX_UPLOAD_BYTES // 2**20} MiB", at)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise Refused(400, f"{at}: not valid base64", at) from None
    return decode_image(data, at)


def completion(reply: dict, req: ChatRequest, cid: str, created: int) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": req.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply["text"]},
                         "finish_reason": reply["finish_reason"], "logprobs": None}],
            "usage": usage(reply)}


def usage(reply: dict) -> dict:
    return {"prompt_tokens": reply["prompt_tokens"], "completion_tokens": reply["completion_tokens"],
            "total_tokens": reply["prompt_tokens"] + reply["completion_tokens"]}


def completion_events(reply: dict, req: ChatRequest, cid: str, created: int):
    """The reply as OpenAI's server-sent events: a role chunk, a chunk per word, the finish reason,
    the usage if asked for, ``[DONE]``. The reply is generated whole first (the models' ``generate``
    takes no streamer), so streaming changes the format, not when the first word comes."""
    def event(choices: list, **extra) -> bytes:
        return b"data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                       "model": req.model, "choices": choices, **extra}).encode() + b"\n\n"

    def choice(delta: dict, finish: str | None = None) -> list:
        return [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]

    yield event(choice({"role": "assistant", "content": ""}))
    for piece in WORDS.findall(reply["text"]):
        yield event(choice({"content": piece}))
    yield event(choice({}, reply["finish_reason"]))
    if req.include_usage:
        yield event([], usage=usage(reply))
    yield b"data: [DONE]\n\n"
