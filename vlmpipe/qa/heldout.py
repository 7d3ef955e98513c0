"""The QA model on held-out conversations: loss, teacher-forced answer accuracy and greedy exact match
turn by turn (the true earlier turns as history), and the blind baseline it must beat."""
from __future__ import annotations

from typing import Sequence

import torch

from vlmpipe.data.conversations import QADataset, frame_conversations
from vlmpipe.scoring.heldout import exact_match, predict_turns, teacher_forced_totals
from vlmpipe.scoring.metrics import BlindBaseline


@torch.no_grad()
def qa_scores(model, data: QADataset, batch_size: int = 64,
              questions: Sequence[tuple[int, int]] = ()) -> dict[str, float]:
    """``val_loss`` (mean NLL per answer/EOS token over ``data``), ``val_answer_acc`` (teacher-forced:
    every token of the answer and its EOS is the argmax) and, for ``questions`` ((conversation,
    turn) pairs), ``exact_match`` of the greedy answers, normalised (lower-case, no punctuation
    or articles)."""
    out = teacher_forced_totals(model, data, batch_size)
    if questions:
        out["exact_match"] = exact_match(predict_turns(model, data, questions, batch_size),
                                         [data.conversations[i][j][1] for i, j in questions])
    return out


def blind_baseline(df) -> BlindBaseline:
    """The most frequent training answer per question (and type): what a model that ignores the image gets."""
    _, convs, types = frame_conversations(df, "train")
    return BlindBaseline((q, a, t) for c, ts in zip(convs, types) for (q, a), t in zip(c, ts))
