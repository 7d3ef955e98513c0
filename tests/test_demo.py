"""The web demo, ``python -m vlmpipe serve``: its upload checks, its HTTP API, and the page in a
real headless Chromium on the tiny preset's models."""
from __future__ import annotations

import io
import json
import os
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import browser
import servers
from vlmpipe.sources.shapes import SHAPES
from vlmpipe.core.errors import UserError
from vlmpipe.face.serve import MAX_PIXELS, decode_image


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming ``width``×``height`` pixels, with no pixel data."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


# ------------------------------------------------------------------ upload checks (fast)


def test_decode_image_reads_a_png_as_rgb():
    arr = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    im = decode_image(png_bytes(arr))
    assert im.mode == "RGB" and im.size == (30, 20)
    assert np.array_equal(np.asarray(im), arr)


@pytest.mark.parametrize("data, says", [
    (b"", "empty"),
    (b"hello, this is text", "not an image"),
    (png_bytes(np.zeros((64, 64, 3), np.uint8))[:60], "cannot read image"),
    (png_header_only(8000, 8000), "megapixels"),          # over ours, under Pillow's own limit
    (png_header_only(30000, 30000), "megapixels"),        # over Pillow's bomb limit too
])
def test_decode_image_refuses_a_bad_upload_in_one_line(data, says):
    with pytest.raises(UserError) as e:
        decode_image(data)
    assert says in str(e.value) and "\n" not in str(e.value)
    assert 8000 * 8000 > MAX_PIXELS


def test_decode_image_refuses_too_many_bytes(monkeypatch):
    import vlmpipe.face.serve as serve

    monkeypatch.setattr(serve, "MAX_UPLOAD_BYTES", 100)
    with pytest.raises(UserError, match="MiB"):
        serve.decode_image(png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))


def _serve(*args: str, cwd: Path, timeout: float = 120):
    return servers.run(["python", "-m", "vlmpipe", "serve", *args], cwd=cwd, env=servers.clean_env(),
                       timeout=timeout, check=False)


def test_serve_refuses_a_busy_port_in_one_line(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        p = _serve("--port", str(s.getsockname()[1]), cwd=tmp_path)
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "--port" in err[0] and "Traceback" not in p.stderr


def test_serve_without_trained_models_says_what_to_run(tmp_path):
    p = _serve("--port", str(servers.free_port()), cwd=tmp_path)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "no trained model found" in p.stderr and "dvc repro" in p.stderr


# ------------------------------------------------------------------ a served demo (tiny preset)


@pytest.fixture(scope="module")
def demo_url(tiny_repo, tmp_path_factory):
    """``python -m vlmpipe serve`` in the tiny repo, on a free loopback port; stopped afterwards."""
    port = servers.free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("demo") / "serve.log"
    with servers.background(["python", "-m", "vlmpipe", "serve", "--port", str(port)], log_path=log,
                            ready=lambda: servers.http_ok(url + "/api/info"), timeout=300,
                            env=tiny_repo.env(), cwd=tiny_repo.path, name="vlmpipe serve"):
        yield url


def _post(url: str, data: bytes, content_type: str = "application/octet-stream") -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _single_shape_val_image(repo: Path, out: Path) -> tuple[Path, str]:
    """A held-out image of one shape (its kind read from its reference captions), as a PNG file."""
    from vlmpipe.data.coco import CocoCaptions

    val = CocoCaptions(repo / "data" / "coco", "val")
    for image_id in val.ids:
        kinds = {k for c in val.captions(image_id) for k in SHAPES if k in c.split()}
        if len(kinds) == 1 and "large" in val.captions(image_id)[0]:
            val.image(image_id).save(out)
            return out, kinds.pop()
    raise AssertionError("no held-out image of one large shape in the tiny data")


@pytest.mark.slow
def test_the_page_captions_answers_and_reports_a_broken_upload_in_a_real_browser(tiny_repo, demo_url, tmp_path):
    if browser.missing():
        if os.environ.get("VLMPIPE_REQUIRE_BROWSER") == "1":
            pytest.fail(browser.missing())
        pytest.skip(browser.missing())
    image, kind = _single_shape_val_image(tiny_repo.path, tmp_path / "one_shape.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(image.read_bytes()[:80])  # a PNG cut off inside its pixel data
    questions = ["How many shapes are there?", "What colour is it?"]
    # What the command line says about the same file, through the same models.
    env, cwd = tiny_repo.env(), tiny_repo.path
    cli_caption = servers.run(["python", "-m", "vlmpipe", "caption", str(image)], cwd=cwd, env=env,
                              timeout=300).stdout.split("\t", 1)[1].strip()
    cli_chat = servers.run(["python", "-m", "vlmpipe", "chat", str(image), *[a for q in questions for a in
                            ("--message", q)]], cwd=cwd, env=env, timeout=300).stdout.strip().splitlines()

    with browser.chrome() as driver:
        page = browser.DemoPage(driver, demo_url)
        assert page.models() == ["chat", "qa"]
        assert page.examples() > 0
        caption = page.upload(image)
        assert caption == cli_caption  # the page shows what the model says, through the same path
        # A caption of the shapes world. Whether the tiny captioner names this one image's shape right
        # is a property of the model, scored over the whole held-out split in test_pipeline.py.
        assert set(caption.split()) & set(SHAPES), f"the caption {caption!r} of a {kind} names no shape"
        # A two-turn conversation: the second answer depends on the first turn being sent back.
        assert [page.say(q) for q in questions] == cli_chat
        qa_answer = page.say("How many shapes are there?", model="qa")
        assert qa_answer.strip() and page.replies() == [qa_answer]  # a new model, a new conversation
        page.screenshot(tmp_path / "demo.png")

        message = page.upload(broken)
        assert "cannot read image" in message and broken.name in message
        assert page.upload(image) == cli_caption  # still serving, same answer
    assert Image.open(tmp_path / "demo.png").size[0] >= 1000


@pytest.mark.slow
def test_the_http_api_answers_bad_requests_with_one_line_and_keeps_serving(tiny_repo, demo_url):
    status, body = _post(demo_url + "/api/image", b"not an image")
    assert status == 400 and "not an image" in body["error"]
    status, body = _post(demo_url + "/api/image", png_header_only(30000, 30000))
    assert status == 400 and "megapixels" in body["error"]
    status, body = _post(demo_url + "/api/reply", b"{not json", "application/json")
    assert status == 400 and "expected JSON" in body["error"]
    status, body = _post(demo_url + "/api/reply", json.dumps(
        {"image": "0" * 20, "model": "chat", "message": "hi", "history": []}).encode(), "application/json")
    assert status == 400 and "upload it again" in body["error"]

    with urllib.request.urlopen(demo_url + "/api/info", timeout=30) as r:
        info = json.loads(r.read())
    first = info["examples"][0]
    status, picked = _post(f"{demo_url}/api/example/{first}", b"")
    assert status == 200 and picked["caption"] and len(picked["references"]) == 5
    status, body = _post(demo_url + "/api/reply", json.dumps(
        {"image": picked["image"], "model": "nope", "message": "hi", "history": []}).encode(), "application/json")
    assert status == 400 and "'nope' is not loaded" in body["error"]
    status, body = _post(demo_url + "/api/reply", json.dumps(
        {"image": picked["image"], "model": "chat", "message": "How many shapes are there?",
         "history": []}).encode(), "application/json")
    assert status == 200 and body["reply"].strip()
    status, body = _post(f"{demo_url}/api/example/123456789", b"")
    assert status == 400 and "not one of the demo's held-out images" in body["error"]
