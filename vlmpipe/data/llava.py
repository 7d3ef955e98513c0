"""Conversations about COCO images in the LLaVA-Instruct format: the format and its reader.

The format (``llava_instruct_150k.json``), kept exactly::

    [{"id": "000000033471", "image": "000000033471.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                        {"from": "gpt", "value": "The bus in the image is white and red."}, ...]}, ...]

Turns alternate human/gpt, starting with human; the first human turn carries the ``<image>``
marker (before or after its text). Read as LLaVA publishes it, too: a record without ``image``
(or with ``"image": null``) is a text-only conversation (LLaVA-1.5's mix holds ShareGPT's);
``image`` may name folders (``coco/train2017/000000033471.jpg``, ``gqa/images/2354786.jpg``; see
``image_source``); ids need not be unique (LLaVA names a record by its image, and one image has
several conversations); the file may be one JSON list or JSON Lines (one record per line, as
LLaVA's evaluation sets come), told apart by content. build_conversations
(``vlmpipe/sources/llava.py``) writes ``data/conversations/`` in it:

    train.json, val.json   the training and held-out conversations, in that format
    turn_types.json        {id: [type of each gpt turn]} where the source knows them (synthetic)
    summary.json           counts, the source and the sha256 of the file read
"""
from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from vlmpipe.core.errors import UserError

IMAGE_TOKEN = "<image>"
ROLES = ("human", "gpt")
MAX_FILE_BYTES = 4 << 30  # the 150K file is ~230 MB; anything near this is not a conversations file
SCHEMA = ('expected LLaVA records {"id", "image" (optional), "conversations": [{"from": "human", "value"}, '
          '{"from": "gpt", "value"}, ...]} as a JSON list or JSON Lines')
# The first folder of an image path that still names a COCO image (joined by its file name).
COCO_FOLDERS = ("coco", "train2017", "val2017", "train2014", "val2014")


def has_image(record: dict) -> bool:
    return record.get("image") is not None


def _keys(obj: Any) -> str:
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}"
    keys = [repr(k)[:40] for k in list(obj)[:6]] + (["..."] if len(obj) > 6 else [])
    return "keys " + ", ".join(keys) if keys else "an empty object"


def validate(records: Any, where: str, check_text_only: bool = True) -> list[dict]:
    """``records`` as a list of LLaVA conversations, or a ``UserError`` naming the first bad record:
    not the LLaVA schema, a missing id, an image that is not a path, roles not alternating
    human/gpt (human first), an empty value, or no ``<image>`` in the first human turn of a
    conversation about an image. ``check_text_only=False``: text-only records (the caller drops
    them) are checked for the schema and id only."""
    if not isinstance(records, list):
        raise UserError(f"{where}: not a LLaVA-format file ({_keys(records)}; {SCHEMA})")
    for n, r in enumerate(records):
        rid = r.get("id") if isinstance(r, dict) else None
        at = f"{where}: record {n}" + (f" (id {rid!r})" if isinstance(rid, (str, int)) else "")
        if not isinstance(r, dict) or "conversations" not in r:
            raise UserError(f"{at}: not a LLaVA conversation ({_keys(r)}; {SCHEMA})")
        if "id" not in r:
            raise UserError(f"{at}: missing key 'id'")
        if not isinstance(r["id"], (str, int)) or isinstance(r["id"], bool):
            raise UserError(f"{at}: id must be a string or a number")
        if r.get("image") is not None and (not isinstance(r["image"], str) or not r["image"].strip()):
            raise UserError(f"{at}: image must be a file name such as 000000033471.jpg "
                            "or coco/train2017/000000033471.jpg")
        if not has_image(r) and not check_text_only:
            continue
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
        if has_image(r) and IMAGE_TOKEN not in turns[0]["value"]:
            raise UserError(f"{at}: the first human turn has no {IMAGE_TOKEN} marker")
    return records


def _json_lines(data: bytes, path: Path) -> list:
    """The values of a JSON Lines file, one per non-blank line."""
    out = []
    for n, line in enumerate(data.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {n}: not JSON ({e.msg} at column {e.colno}); "
                                "read as JSON Lines, one record per line") from None
            except UnicodeDecodeError:
                raise UserError(f"{path}: line {n}: not UTF-8 text") from None
    return out


def read(path: str | os.PathLike, check_text_only: bool = True) -> list[dict]:
    """A LLaVA-format file (a JSON list, or JSON Lines), validated (``UserError`` naming the file and record)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise UserError(f"{path}: {path.stat().st_size} bytes, larger than any conversations file should be")
        data = path.read_bytes()
        records = json.loads(data)
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        if e.msg != "Extra data" or not data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
            raise UserError(f"{path}: not JSON ({e})") from None
        records = _json_lines(data, path)  # objects one after another: JSON Lines
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not JSON ({e})") from None
    if isinstance(records, dict) and "conversations" in records:
        records = [records]  # JSON Lines of one record
    return validate(records, str(path), check_text_only)


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


def image_source(name: str) -> str:
    """The dataset an image path names: ``coco`` for a bare file name or one under a COCO folder
    (``train2017/``, ``coco/train2017/``, ...), else its first folder (``gqa``, ``vg``, ``ocr_vqa``, ...)."""
    parts = PurePosixPath(name.replace("\\", "/").lstrip("/")).parts
    return "coco" if len(parts) <= 1 or parts[0] in COCO_FOLDERS else parts[0]


def image_id(name: str) -> int | None:
    """The COCO image id of a COCO image path (``000000033471.jpg``, ``coco/train2017/000000033471.jpg``,
    ``COCO_train2014_000000033471.jpg``); None if not one."""
    if image_source(name) != "coco":
        return None
    stem = PurePosixPath(name.replace("\\", "/")).stem
    if stem.startswith("COCO_"):
        stem = stem.rsplit("_", 1)[-1]
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
