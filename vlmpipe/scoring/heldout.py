"""Held-out scoring shared by the language-model wings: teacher-forced loss and answer accuracy, greedy
answers turn by turn, a fixed subset of held-out turns, and exact match.

Each model's own scoring lives in its wing (``vlmpipe/<wing>/heldout.py``); the training stages and
evaluate score through the same functions, so a per-epoch figure and the final one are computed the
same way. The functions take models and data, and import no model code.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from vlmpipe.models.lm.collate import IGNORE_INDEX
from vlmpipe.scoring.metrics import normalize_answer

log = logging.getLogger(__name__)


@torch.no_grad()
def teacher_forced(model, batch) -> dict[str, float]:
    """Summed loss, labelled-token count, and answers whose every token (EOS too) is the argmax.

    The last is teacher-forced exact match: it equals greedy-decoding exact match before
    normalisation (greedy output is the answer iff each answer token is the argmax given the
    ones before it).
    """
    logits, labels = model.text_logits(batch)
    logits = logits.float()
    valid = labels != IGNORE_INDEX
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    right = (logits.argmax(-1) == labels) | ~valid
    # An answer is a maximal run of labelled positions; a run ends at each EOS.
    eos = (labels == model.tokenizer.eos_token_id) & valid
    # Position p belongs to answer j = the number of answer EOS tokens strictly before it.
    ans_id = torch.cumsum(eos.long(), dim=1) - eos.long()
    b, t = labels.shape
    wrong = torch.zeros(b, t + 1, dtype=torch.long, device=labels.device)
    wrong.scatter_add_(1, ans_id, (~right).long())
    n_ans = eos.sum(1, keepdim=True)  # a truncated last answer without its EOS is not counted
    answers_right = int(((wrong[:, :t] == 0) & (torch.arange(t, device=labels.device) < n_ans)).sum())
    return {"nll_sum": float((nll * valid).sum()), "label_tokens": int(valid.sum()),
            "answers": int(n_ans.sum()), "answers_right": answers_right}


def predict_turns(model, data, questions: Sequence[tuple[int, int]], batch_size: int = 64,
                  history: bool = True) -> list[str]:
    """Greedy answers to turn ``j`` of conversation ``i`` of ``data`` (a ``QADataset`` or ``ChatDataset``)
    for each (i, j): after the true earlier turns (``history``), or with them removed (what an answer
    owes to the conversation)."""
    preds: list[str] = []
    for s in range(0, len(questions), batch_size):
        chunk = questions[s:s + batch_size]
        feats = torch.stack([torch.as_tensor(data.feats[data.image_row(i)]) for i, _ in chunk])
        preds += model.answer(feats, [data.conversations[i][j][0] for i, j in chunk],
                              [data.conversations[i][:j] if history else [] for i, j in chunk])
    return preds


def eval_questions(data, max_questions: int, seed: int = 0) -> list[tuple[int, int]]:
    """A fixed subset of held-out (conversation, turn) pairs of ``data.conversations`` (a ``QADataset`` or
    ``ChatDataset``): whole conversations, randomly chosen."""
    order = torch.randperm(len(data.conversations), generator=torch.Generator().manual_seed(seed)).tolist()
    out: list[tuple[int, int]] = []
    for i in order:
        if len(out) >= max_questions:
            break
        out += [(i, j) for j in range(len(data.conversations[i]))]
    return out[:max_questions]


def validation_loss(model, data, batch_size: int = 128) -> float:
    """Mean loss per target token (caption tokens + EOS) over every sample of ``data``, in order."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                out = model(model.collate([data[i] for i in range(start, min(len(data), start + batch_size))]),
                            reduction="sum")
                total += float(out["loss"])
                count += int(out["targets"])
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("validation set has no target tokens")
    return total / count


@torch.no_grad()
def teacher_forced_totals(model, data, batch_size: int = 64) -> dict[str, float]:
    """``teacher_forced`` summed over every sample of ``data`` in order, as ``val_loss`` (mean NLL per
    labelled token) and ``val_answer_acc`` (answers whose every token, EOS too, is the argmax)."""
    tot = {"nll_sum": 0.0, "label_tokens": 0, "answers": 0, "answers_right": 0}
    for s in range(0, len(data), batch_size):
        st = teacher_forced(model, model.collate([data[i] for i in range(s, min(s + batch_size, len(data)))]))
        for k in tot:
            tot[k] += st[k]
    return {"val_loss": tot["nll_sum"] / max(tot["label_tokens"], 1),
            "val_answer_acc": tot["answers_right"] / max(tot["answers"], 1)}


def exact_match(preds: Sequence[str], truth: Sequence[str]) -> float:
    """Share of ``preds`` equal to ``truth`` after normalisation (lower-case, no punctuation or articles)."""
    return sum(normalize_answer(p) == normalize_answer(t) for p, t in zip(preds, truth)) / len(truth)
