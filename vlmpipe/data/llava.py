"""Conversations about COCO images in the LLaVA-Instruct format: the format and its reader.

The format (``llava_instruct_150k.json``), kept exactly::

    [{"id": "000000033471", "image": "000000033471.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                        {"from": "gpt", "value": "The bus in the image is white and red."}, ...]}, ...]

Turns alternate human/gpt, starting with human; the first human turn carries the ``<image>``
marker (before or after its text). build_conversations (``vlmpipe/sources/llava.py``) writes
``data/conversations/`` in it:

    train.json, val.json   the training and held-out conversations, in that format
    turn_types.json        {id: [type of each gpt turn]} where the source knows them (synthetic)
    summary.json           counts, the source and the sha256 of the file read
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from vlmpipe.core.errors import UserError

IMAGE_TOKEN = "<image>"
ROLES = ("human", "gpt")
MAX_FILE_BYTES = 4 << 30  # the 150K file is ~230 MB; anything near this is not a conversations file


def validate(records: Any, where: str) -> list[dict]:
    """``records`` as a list of LLaVA conversations, or a ``UserError`` naming the first bad record:
    not a list of objects, missing keys, roles not alternating human/gpt (human first), an empty
    value, no ``<image>`` in the first human turn, or an id given twice."""
    if not isinstance(records, list):
        raise UserError(f"{where}: not a LLaVA-format file (expected a JSON list of conversations, "
                        f"got {type(records).__name__})")
    seen: set[str] = set()
    for n, r in enumerate(records):
        rid = r.get("id") if isinstance(r, dict) else None
        at = f"{where}: record {n}" + (f" (id {rid!r})" if rid is not None else "")
        if not isinstance(r, dict):
            raise UserError(f"{at}: not an object")
        for key in ("id", "image", "conversations"):
            if key not in r:
                raise UserError(f"{at}: missing key {key!r}")
        if not isinstance(r["id"], (str, int)) or str(r["id"]) in seen:
            raise UserError(f"{at}: id must be a string, unique in the file")
        seen.add(str(r["id"]))
        if not isinstance(r["image"], str) or not r["image"].strip():
            raise UserError(f"{at}: image must be a file name such as 000000033471.jpg")
        turns = r["conversations"]
        if not isinstance(turns, list) or len(turns) < 2:
            raise UserError(f"{at}: conversations must be a list of at least one human and one gpt turn")
        for t, turn in enumerate(turns):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise UserError(f"{at}: turn {t} must be an object with 'from' and 'value'")
            if turn["from"] != ROLES[t % 2]:
                raise UserError(f"{at}: turn {t} is from {turn['from']!r}, expected {ROLES[t % 2]!r} "
                                "(turns alternate human, gpt, starting with human)")
            if not isinstance(turn["value"], str) or not turn["value"].replace(IMAGE_TOKEN, "").strip():
                raise UserError(f"{at}: turn {t} has an empty value")
        if len(turns) % 2:
            raise UserError(f"{at}: ends with a human turn that has no gpt answer")
        if IMAGE_TOKEN not in turns[0]["value"]:
            raise UserError(f"{at}: the first human turn has no {IMAGE_TOKEN} marker")
    return records


def read(path: str | os.PathLike) -> list[dict]:
    """A LLaVA-format JSON file, validated (``UserError`` naming the file and record)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise UserError(f"{path}: {path.stat().st_size} bytes, larger than any conversations file should be")
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not JSON ({e})") from None
    return validate(data, str(path))


def turns_of(record: dict) -> list[tuple[str, str]]:
    """(human text, gpt text) pairs of a record, the ``<image>`` marker removed (the image is the prefix)."""
    c = record["conversations"]
    return [(strip_image_token(c[i]["value"]), c[i + 1]["value"].strip()) for i in range(0, len(c) - 1, 2)]


def strip_image_token(text: str) -> str:
    return " ".join(text.replace(IMAGE_TOKEN, " ").split())


def record(rid: str, image: str, turns: Sequence[tuple[str, str]]) -> dict:
    """A LLaVA record; the first human turn gets the ``<image>`` marker in front, as LLaVA writes it."""
    conv = []
    for i, (q, a) in enumerate(turns):
        conv += [{"from": "human", "value": f"{IMAGE_TOKEN}\n{q}" if i == 0 else q}, {"from": "gpt", "value": a}]
    return {"id": rid, "image": image, "conversations": conv}


def image_id(name: str) -> int | None:
    """The COCO image id of a file name such as ``000000033471.jpg`` (or ``train2017/...``); None if not one."""
    stem = Path(name).stem
    return int(stem) if stem.isdigit() else None


def load_split(root: str | os.PathLike, split: str) -> tuple[list[dict], dict[str, list[str]]]:
    """(records, turn types by id) of ``data/conversations/{split}.json``."""
    root = Path(root)
    f = root / f"{split}.json"
    if not f.is_file():
        raise UserError(f"{f}: not found (run `dvc repro build_conversations`)")
    records = read(f)
    tf = root / "turn_types.json"
    types = json.loads(tf.read_text()) if tf.is_file() else {}
    return records, types


def default_types(n_turns: int) -> list[str]:
    """Turn types where the source records none: the opening turn, then later turns."""
    return ["first"] + ["later"] * (n_turns - 1)
