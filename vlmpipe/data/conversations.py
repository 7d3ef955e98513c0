"""Questions and answers about an image as training examples for the QA model.

The conversation template (``TEMPLATE``, the only one; recorded in the saved model)::

    [K image prefix vectors]
    Question: {q1}\nAnswer: {a1}<eos>Question: {q2}\nAnswer: {a2}<eos> ...

Each turn is tokenized piecewise — ``"Question: {q}\nAnswer:"``, then ``" {a}"``, then the
EOS id — and the pieces are concatenated, so the answer tokens are known exactly. Labels
cover the answer tokens and the EOS after each answer only; questions and padding are
``IGNORE_INDEX``. The EOS teaches the model to stop. At inference the prompt is the earlier
turns in full, then ``"Question: {q}\nAnswer:"`` (``encode_prompt``), which is exactly what
training saw before that answer.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from vlmpipe.data.collate import IGNORE_INDEX
from vlmpipe.data.qa import A_COLS, Q_COLS, T_COLS

log = logging.getLogger(__name__)

TEMPLATE = {
    "name": "qa-v1",
    "image": "K prefix vectors from the projector, before any text",
    "question": "Question: {question}\nAnswer:",
    "answer": " {answer}",
    "turn_end": "<eos>",
    "labels": "answer tokens + the EOS after each answer",
}


def question_text(question: str) -> str:
    return TEMPLATE["question"].format(question=" ".join(str(question).split()))


def answer_text(answer: str) -> str:
    return TEMPLATE["answer"].format(answer=" ".join(str(answer).split()))


def conversation_text(turns: Sequence[tuple[str, str]], eos_token: str) -> str:
    """A conversation in the template, as plain text (the tiny base's LM warm-up reads these)."""
    return "".join(question_text(q) + answer_text(a) + eos_token for q, a in turns)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_conversation(tokenizer, turns: Sequence[tuple[str, str]],
                        max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation (without the image prefix).

    Whole turns that would exceed ``max_tokens`` are dropped (at least one turn is kept, cut
    to ``max_tokens``).
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    for q, a in turns:
        q_ids = _ids(tokenizer, question_text(q))
        a_ids = _ids(tokenizer, answer_text(a)) + [eos]
        if max_tokens is not None and ids and len(ids) + len(q_ids) + len(a_ids) > max_tokens:
            break
        ids += q_ids + a_ids
        labels += [IGNORE_INDEX] * len(q_ids) + a_ids
    if max_tokens is not None:
        ids, labels = ids[:max_tokens], labels[:max_tokens]
    return ids, labels


def encode_prompt(tokenizer, question: str, history: Sequence[tuple[str, str]] = (),
                  max_tokens: int | None = None) -> list[int]:
    """Prompt ids for ``question`` after the earlier ``history`` turns (oldest dropped first if too long)."""
    eos = tokenizer.eos_token_id
    tail = _ids(tokenizer, question_text(question))
    turns = [_ids(tokenizer, question_text(q)) + _ids(tokenizer, answer_text(a)) + [eos] for q, a in history]
    while turns and max_tokens is not None and sum(map(len, turns)) + len(tail) > max_tokens:
        turns.pop(0)
    ids = [t for turn in turns for t in turn] + tail
    return ids[-max_tokens:] if max_tokens is not None else ids


def frame_conversations(df, split: str) -> tuple[list[int], list[list[tuple[str, str]]], list[list[str]]]:
    """(Dataset_Index per row, its (question, answer) turns, their question types) for one split of the Q/A CSV."""
    rows = df[df["Split"] == split] if "Split" in df.columns else df
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

    def __getitem__(self, i: int) -> dict:
        ids, labels = self.encoded[i]
        return {"feats": self.feats[i], "input_ids": ids, "labels": labels}
