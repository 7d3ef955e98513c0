"""Multi-turn conversations as training examples for the chat model.

In the chat template (``vlmpipe.models.lm.templates.CHAT``): labels on the assistant's tokens and
each EOS, never the user's text or padding; the ``<image>`` marker of the LLaVA text is dropped.

A conversation longer than the LM's positions is cut into *windows* at turn boundaries: the last
window holds the latest turns that fit, the one before it the turns before those, and so on, so
every assistant turn is trained once, with as much of the earlier conversation as fits in front
of it (whole turns dropped from the front). A single turn longer than the window keeps its start.
At inference the prompt is the earlier turns, oldest dropped first, then the user's part: what
training saw before that answer.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from vlmpipe.data import features as embeddings
from vlmpipe.data import llava
from vlmpipe.models.chat_model import CHAT
from vlmpipe.core.errors import UserError

log = logging.getLogger(__name__)

def windows(encoded: Sequence[tuple[list[int], list[int]]], max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """Training windows of one conversation's encoded turns (see the module text), oldest first."""
    out = []
    end = len(encoded)
    while end > 0:
        start, size = end - 1, len(encoded[end - 1][0])
        while start > 0 and size + len(encoded[start - 1][0]) <= max_tokens:
            start -= 1
            size += len(encoded[start][0])
        ids = [t for turn in encoded[start:end] for t in turn[0]][:max_tokens]
        labels = [t for turn in encoded[start:end] for t in turn[1]][:max_tokens]
        out.append((ids, labels))
        end = start
    return out[::-1]


class ChatDataset(torch.utils.data.Dataset):
    """Conversations paired with cached image features, as training windows tokenized once up front.

    ``feats``: Tensor [N, R, D]; ``conversations[i]``: the (user, assistant) turns about image row
    ``image_rows[i]`` of ``feats`` (kept raw too, for evaluation). Items: ``{"feats", "input_ids", "labels"}``.
    A text-only conversation (row None) gets zero features and ``"has_image": False``: the model
    masks its prefix out of the LM's attention (``PrefixLM.text_logits``).
    """

    def __init__(self, tokenizer, feats: torch.Tensor, image_rows: Sequence[int | None],
                 conversations: Sequence[Sequence[tuple[str, str]]], max_tokens: int) -> None:
        if len(image_rows) != len(conversations):
            raise ValueError(f"{len(image_rows)} image rows but {len(conversations)} conversations")
        self.feats, self.image_rows = feats, list(image_rows)
        self.conversations = [list(c) for c in conversations]
        self.items: list[tuple[int, list[int], list[int]]] = []
        split = 0
        for i, conv in enumerate(self.conversations):
            w = windows(CHAT.encode_turns(tokenizer, conv), max_tokens)
            split += len(w) > 1
            self.items += [(i, ids, labels) for ids, labels in w]
        if split:
            log.info("%d of %d conversations are longer than %d tokens: cut into %d windows at turn boundaries",
                     split, len(conversations), max_tokens, len(self.items))

    def image_row(self, conv: int) -> int | None:
        """The row of ``feats`` that conversation ``conv`` is about (None: a text-only conversation)."""
        return self.image_rows[conv]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        conv, ids, labels = self.items[i]
        row = self.image_rows[conv]
        if row is None:
            return {"feats": self.feats.new_zeros(self.feats.shape[1:]), "input_ids": ids, "labels": labels,
                    "has_image": False}
        return {"feats": self.feats[row], "input_ids": ids, "labels": labels}

    def num_tokens(self) -> int:
        return sum(len(ids) for _, ids, _ in self.items)


def coco_caches(embeddings_root: Path, encoder: dict) -> list:
    """The train and val COCO feature caches made by ``encoder``, read once for a stage: conversations
    held out from train2017 are about train images, so both splits read both."""
    return [embeddings.load(embeddings_root, "coco", s, expect_encoder=dict(encoder)) for s in ("train", "val")]


def conversation_features(records: Sequence[dict], caches: Sequence,
                          where: Path) -> tuple[torch.Tensor, list[int | None]]:
    """(features [M, R, D], the row of each record's image, None for a text-only record): the features
    of the images the ``records`` are about, from the train or val cache of ``caches`` (``where``: the
    file that names them)."""
    index = {}
    for c, cache in enumerate(caches):
        for r, i in enumerate(cache.ids.tolist()):
            index.setdefault(int(i), (c, r))
    order: dict[int, int] = {}
    rows = []
    for rec in records:
        if not llava.has_image(rec):
            rows.append(None)
            continue
        iid = llava.image_id(rec["image"])
        if iid not in index:
            raise UserError(f"{where}: record {rec['id']!r} is about image {rec['image']}, which has no cached "
                            f"COCO features (rerun `dvc repro build_conversations`)")
        rows.append(order.setdefault(iid, len(order)))
    picks = [index[i] for i in order]
    feats = torch.stack([torch.as_tensor(caches[c].embeddings[r]) for c, r in picks]) if picks else torch.empty(0)
    return feats, rows


def load_conversations(conv_root: Path, split: str, caches: Sequence
                       ) -> tuple[torch.Tensor, list, list[list[tuple[str, str]]], list[list[str]], list[dict]]:
    """(features, image rows (None: text-only), turns, turn types, records) of
    ``data/conversations/{split}.json``, the features from ``caches`` (``coco_caches``)."""
    records, types = llava.load_split(conv_root, split)
    feats, rows = conversation_features(records, caches, conv_root / f"{split}.json")
    turns = [llava.turns_of(r) for r in records]
    kinds = [types.get(str(r["id"])) or llava.default_types(len(t)) for r, t in zip(records, turns)]
    return feats, rows, turns, kinds, records
