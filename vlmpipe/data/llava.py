"""Conversations about COCO images in the LLaVA-Instruct format, and the build_conversations stage.

The format (``llava_instruct_150k.json``), kept exactly::

    [{"id": "000000033471", "image": "000000033471.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                        {"from": "gpt", "value": "The bus in the image is white and red."}, ...]}, ...]

Turns alternate human/gpt, starting with human; the first human turn carries the ``<image>``
marker (before or after its text). ``build`` writes ``data/conversations/``:

    train.json, val.json   the training and held-out conversations, in that format
    turn_types.json        {id: [type of each gpt turn]} where the source knows them (synthetic)
    summary.json           counts, the source and the sha256 of the file read

Held-out conversations are those about val2017 images; when there are none (LLaVA-Instruct-150K
is all about train2017), ``heldout_fraction`` of the train2017 images are held out, seeded, with
every conversation about them. A conversation whose image is not in ``data/coco`` is dropped
and counted.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from vlmpipe.core import hub
from vlmpipe.core import remote
from vlmpipe.data.coco import SPLITS, CocoCaptions
from vlmpipe.core.download import default_download_dir, download, file_digest
from vlmpipe.core.errors import UserError
from vlmpipe.core.io import atomic_path, write_json

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
ROLES = ("human", "gpt")
HUB_FILE = remote.LLAVA_FILE
MAX_FILE_BYTES = 4 << 30  # the 150K file is ~230 MB; anything near this is not a conversations file
FILES = ("train.json", "val.json", "turn_types.json", "summary.json")


# ----------------------------------------------------------------------------- the format


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


# ----------------------------------------------------------------------------- the stage


def _split_by_image(records: list[dict], coco_root: Path, heldout_fraction: float,
                    seed: int) -> tuple[list[dict], list[dict], Counter]:
    """(train, held-out) records by where their image is in ``data/coco``, and the drop counts."""
    where: dict[int, str] = {}
    for split in SPLITS:
        for i in CocoCaptions(coco_root, split).ids:
            where[i] = split
    parts: dict[str, list[dict]] = {"train": [], "val": []}
    dropped: Counter = Counter()
    first: dict[str, str] = {}
    for r in records:
        iid = image_id(r["image"])
        why = ("image is not a COCO file name" if iid is None else
               f"image not in {coco_root}" if iid not in where else None)
        if why is None:
            parts[where[iid]].append(r)
        else:
            dropped[why] += 1
            first.setdefault(why, f"id {r['id']!r}, image {r['image']!r}")
    for why, n in sorted(dropped.items()):
        log.warning("dropped %d conversations: %s (the first: %s)", n, why, first[why])
    train, val = parts["train"], parts["val"]
    if not val and train:
        images = sorted({image_id(r["image"]) for r in train})
        n = max(1, round(heldout_fraction * len(images)))
        held = set(np.random.default_rng([seed, 150]).choice(images, size=n, replace=False).tolist())
        val = [r for r in train if image_id(r["image"]) in held]
        train = [r for r in train if image_id(r["image"]) not in held]
    return train, val, dropped


def download_path(revision: str, download_dir: Path | None = None) -> Path:
    """Where the hub's file at ``revision`` is cached (each revision apart: a pinned one never mixes with main)."""
    return (download_dir or default_download_dir()) / "llava-instruct-150k" / revision / HUB_FILE


def _source_file(p, download_dir: Path | None) -> Path:
    """The conversations file ``p`` (``ConversationsParams``) names, downloaded when it is the hub's."""
    if p.path:
        return Path(p.path)
    if not p.url:  # the file's sha256 goes into summary.json either way, so a run records what it read
        hub.warn_unpinned(remote.LLAVA_DATASET, p.revision, "conversations.revision")
    url = p.url or remote.llava_url(p.revision)
    dest = download_path(p.revision, download_dir)
    key = "conversations.url" if p.url else "conversations.source"
    return download(url, dest, key=key, hint=f"put {HUB_FILE} in {dest.parent}, or set conversations.path "
                    "to a copy under inputs/data/, or conversations.url to a mirror")


def build(p, seed: int, coco_root: str | os.PathLike, out: str | os.PathLike,
          download_dir: str | os.PathLike | None = None) -> dict:
    """Write ``out`` (``data/conversations``) from ``p`` (``ConversationsParams``); return the summary."""
    from vlmpipe.data import scene_dialogues

    coco_root, out = Path(coco_root), Path(out)
    types: dict[str, list[str]] = {}
    if p.path or p.source != "synthetic":
        src = _source_file(p, Path(download_dir) if download_dir else None)
        log.info("reading %s", src)
        records = read(src)
        origin = {"file": str(src) if p.path else HUB_FILE, "sha256": file_digest(src, "sha256"),
                  "revision": None if (p.path or p.url) else p.revision}
    else:
        records, types = scene_dialogues.build(coco_root, seed, p.per_image)
        origin = {"file": None, "generator": scene_dialogues.GENERATOR}
    train, val, dropped = _split_by_image(records, coco_root, p.heldout_fraction, seed)
    if p.max_conversations and len(train) > p.max_conversations:
        keep = np.random.default_rng([seed, 151]).choice(len(train), size=p.max_conversations, replace=False)
        train = [train[i] for i in sorted(keep.tolist())]
    if not train or not val:
        raise UserError(f"conversations: {len(train)} training and {len(val)} held-out conversations are about "
                        f"images in {coco_root}; both must be > 0 (is data/coco the COCO the conversations are about?)")
    summary = {"source": "path" if p.path else p.source, **origin, "train": len(train), "val": len(val),
               "train_turns": sum(len(r["conversations"]) // 2 for r in train),
               "val_turns": sum(len(r["conversations"]) // 2 for r in val),
               "dropped": dict(sorted(dropped.items()))}
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        _write_records(tmp / "train.json", train)
        _write_records(tmp / "val.json", val)
        write_json(tmp / "turn_types.json", {r["id"]: types[r["id"]] for r in train + val if r["id"] in types})
        write_json(tmp / "summary.json", summary)
    log.info("conversations: %d train (%d turns), %d held out (%d turns)", summary["train"], summary["train_turns"],
             summary["val"], summary["val_turns"])
    return summary


def _write_records(path: Path, records: Iterable[dict]) -> None:
    # One record per line: diffable, and still exactly one JSON list like the original file.
    rows = [json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in records]
    path.write_text("[\n" + ",\n".join(rows) + "\n]\n", encoding="utf-8")


# ----------------------------------------------------------------------------- reading the output


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
