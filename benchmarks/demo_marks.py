"""How often the demo's marks say "right": every held-out example the page offers, every known question
of it asked through the server's API (``python -m vlmpipe serve`` running), as the page asks them.

Each example's questions are asked in order, as one conversation with the model's own replies sent
back as history (what the page sends when a visitor clicks the suggestions one after another); the
mark is the server's (``/api/reply``'s ``correct``, the evaluation's normalised exact match). The QA
model is asked its examples' questions (single shapes, from the Q/A CSV's test rows); the chat model
its examples' held-out conversations (the scenes). Usage::

    python benchmarks/demo_marks.py http://127.0.0.1:7860
"""
from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request


def call(url: str, body: dict | None = None) -> dict:
    """GET ``url``, or POST ``body`` as JSON to it; the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def marks(url: str, model: str, ids: list[str]) -> tuple[int, int, int]:
    """(replies marked right, replies marked, replies without a mark) over the examples ``ids``."""
    right = marked = unmarked = 0
    for key in ids:
        picked = call(f"{url}/api/example/{key}", {})
        history: list[list[str]] = []
        for q in picked["questions"]:
            out = call(f"{url}/api/reply", {"image": picked["image"], "model": model, "message": q,
                                            "history": history, "example": key})
            history.append([q, out["reply"]])
            if out["correct"] is None:
                unmarked += 1
                continue
            marked += 1
            right += out["correct"]
            print(f"{model}\t{key}\t{'right' if out['correct'] else 'WRONG'}\t{q}\t{out['reply']}\t"
                  f"(held-out: {out['expected']})")
    return right, marked, unmarked


def main(url: str) -> int:
    try:
        info = call(f"{url}/api/info")
    except (urllib.error.URLError, ValueError) as e:  # nothing listening, or not a URL
        raise SystemExit(f"{url}: no demo server answers ({getattr(e, 'reason', e)}); start one with "
                         "`python -m vlmpipe serve`") from None
    for model, ids in (("qa", info["qa_examples"]), ("chat", info["examples"])):
        if model not in info["dialogue"] or not ids:
            continue
        right, marked, unmarked = marks(url, model, ids)
        print(f"== {model}: {right} of {marked} marked replies right over {len(ids)} examples "
              f"({unmarked} replies unmarked)")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="the running demo server, e.g. http://127.0.0.1:7860")
    raise SystemExit(main(ap.parse_args().url.rstrip("/")))
