"""Questions and answers about an image as training examples for the QA model, in its template
(``vlmpipe.models.lm.templates.QA``: labels on the answers and their EOS only)."""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from vlmpipe.models.qa_model import QA
from vlmpipe.data.qa import A_COLS, Q_COLS, T_COLS, part

log = logging.getLogger(__name__)

def encode_conversation(tokenizer, turns: Sequence[tuple[str, str]],
                        max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation (without the image prefix).

    Whole turns that would exceed ``max_tokens`` are dropped (at least one turn is kept, cut
    to ``max_tokens``).
    """
    ids: list[int] = []
    labels: list[int] = []
    for turn_ids, turn_labels in QA.encode_turns(tokenizer, turns):
        if max_tokens is not None and ids and len(ids) + len(turn_ids) > max_tokens:
            break
        ids += turn_ids
        labels += turn_labels
    if max_tokens is not None:
        ids, labels = ids[:max_tokens], labels[:max_tokens]
    return ids, labels


def frame_conversations(df, split: str) -> tuple[list[int], list[list[tuple[str, str]]], list[list[str]]]:
    """(Dataset_Index per row, its (question, answer) turns, their question types) of the Q/A CSV's
    training rows (``split`` "train") or held-out ones ("test"; ``vlmpipe.data.qa.heldout``)."""
    rows = part(df, split) if "Split" in df.columns else df
    idx, convs, types = [], [], []
    for r in rows.to_dict("records"):
        turns = [(str(r[q]), str(r[a])) for q, a in zip(Q_COLS, A_COLS) if r.get(q)]
        idx.append(int(r["Dataset_Index"]))
        convs.append(turns)
        types.append([str(r.get(t) or "unknown") for q, t in zip(Q_COLS, T_COLS) if r.get(q)])
    return idx, convs, types


class QADataset(torch.utils.data.Dataset):
    """Conversations paired with cached image features, tokenized once up front.

    ``feats``: Tensor [N, R, D]; ``conversations[i]``: the (question, answer) turns of image
    ``i`` (kept raw too, for evaluation). Items: ``{"feats", "input_ids", "labels"}``.
    """

    def __init__(self, tokenizer, feats: torch.Tensor, conversations: Sequence[Sequence[tuple[str, str]]],
                 max_tokens: int | None = None) -> None:
        if len(feats) != len(conversations):
            raise ValueError(f"{len(feats)} feature rows but {len(conversations)} conversations")
        self.feats = feats
        self.conversations = [list(c) for c in conversations]
        self.encoded = [encode_conversation(tokenizer, c, max_tokens) for c in self.conversations]
        dropped = sum(len(c) - sum(1 for t in lab if t == tokenizer.eos_token_id)
                      for c, (_, lab) in zip(self.conversations, self.encoded))
        if dropped > 0:
            log.warning("%d Q/A turns did not fit in %s tokens and were dropped", dropped, max_tokens)

    def __len__(self) -> int:
        return len(self.encoded)

    def image_row(self, conv: int) -> int:
        """The row of ``feats`` that conversation ``conv`` is about: its own."""
        return conv

    def __getitem__(self, i: int) -> dict:
        ids, labels = self.encoded[i]
        return {"feats": self.feats[i], "input_ids": ids, "labels": labels}
