"""build_conversations: LLaVA-Instruct conversations about the COCO images in ``data/coco``.

The source is ``llava_instruct_150k.json`` (the hub dataset, or a mirror's URL), a LLaVA-format
file of the user's (``conversations.path``), or dialogues generated from the synthetic scenes.
``build`` writes ``data/conversations/`` in the format ``vlmpipe.data.llava`` reads.

Held-out conversations are those about val2017 images; when there are none (LLaVA-Instruct-150K
is all about train2017), ``heldout_fraction`` of the train2017 images are held out, seeded, with
every conversation about them. A conversation whose image is not in ``data/coco`` is dropped
and counted, as is one about another dataset's image (``gqa/...``, ``vg/...``: counted per
dataset). Conversations without an image are dropped and counted (``text_only: skip``) or
trained as text-only conversations (``text_only: train``; never held out).
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np

from vlmpipe.core import hub
from vlmpipe.core.download import default_download_dir, download, file_digest
from vlmpipe.core.errors import UserError
from vlmpipe.core.io import atomic_path, write_json
from vlmpipe.data.coco import SPLITS, CocoCaptions
from vlmpipe.data.llava import has_image, image_id, image_source, read
from vlmpipe.sources import remote, scene_dialogues

log = logging.getLogger(__name__)

HUB_FILE = remote.LLAVA_FILE
FILES = ("train.json", "val.json", "turn_types.json", "summary.json")


def _split_by_image(records: list[dict], coco_root: Path, heldout_fraction: float, seed: int,
                    keep_text_only: bool) -> tuple[list[dict], list[dict], list[dict], Counter]:
    """(train, held-out, text-only) records by where their image is in ``data/coco``, and the drop counts."""
    where: dict[int, str] = {}
    for split in SPLITS:
        for i in CocoCaptions(coco_root, split).ids:
            where[i] = split
    parts: dict[str, list[dict]] = {"train": [], "val": [], "text": []}
    dropped: Counter = Counter()
    first: dict[str, str] = {}
    for r in records:
        if not has_image(r):
            why = None if keep_text_only else "no image (text-only; conversations.text_only: skip)"
            split = "text"
        else:
            src, iid = image_source(r["image"]), image_id(r["image"])
            why = (f"image from {src!r}, not COCO" if src != "coco" else
                   "image is not a COCO file name" if iid is None else
                   f"image not in {coco_root}" if iid not in where else None)
            split = where.get(iid)
        if why is None:
            parts[split].append(r)
        else:
            dropped[why] += 1
            first.setdefault(why, f"id {r['id']!r}, image {r.get('image')!r}")
    for why, n in sorted(dropped.items()):
        log.warning("dropped %d conversations: %s (the first: %s)", n, why, first[why])
    train, val = parts["train"], parts["val"]
    if not val and train:
        images = sorted({image_id(r["image"]) for r in train})
        n = max(1, round(heldout_fraction * len(images)))
        held = set(np.random.default_rng([seed, 150]).choice(images, size=n, replace=False).tolist())
        val = [r for r in train if image_id(r["image"]) in held]
        train = [r for r in train if image_id(r["image"]) not in held]
    return train, val, parts["text"], dropped


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
    coco_root, out = Path(coco_root), Path(out)
    types: dict[str, list[str]] = {}
    if p.path or p.source != "synthetic":
        src = _source_file(p, Path(download_dir) if download_dir else None)
        log.info("reading %s", src)
        records = read(src, check_text_only=p.text_only == "train")
        origin = {"file": str(src) if p.path else HUB_FILE, "sha256": file_digest(src, "sha256"),
                  "revision": None if (p.path or p.url) else p.revision}
    else:
        records, types = scene_dialogues.build(coco_root, seed, p.per_image)
        origin = {"file": None, "generator": scene_dialogues.GENERATOR}
    train, val, text, dropped = _split_by_image(records, coco_root, p.heldout_fraction, seed,
                                                keep_text_only=p.text_only == "train")
    train += text  # text-only conversations (text_only: train) are trained, never held out
    if p.max_conversations and len(train) > p.max_conversations:
        keep = np.random.default_rng([seed, 151]).choice(len(train), size=p.max_conversations, replace=False)
        train = [train[i] for i in sorted(keep.tolist())]
    n_train = sum(has_image(r) for r in train)
    if not n_train or not val:
        raise UserError(f"conversations: {n_train} training and {len(val)} held-out conversations are about "
                        f"images in {coco_root}; both must be > 0 (is data/coco the COCO the conversations are about?)")
    summary = {"source": "path" if p.path else p.source, **origin, "train": len(train), "val": len(val),
               "train_turns": sum(len(r["conversations"]) // 2 for r in train),
               "val_turns": sum(len(r["conversations"]) // 2 for r in val),
               "dropped": dict(sorted(dropped.items()))}
    if p.text_only == "train":
        summary["text_only"] = sum(not has_image(r) for r in train)
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
