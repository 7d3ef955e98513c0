"""The QA model on held-out conversations: loss, teacher-forced answer accuracy and greedy exact match
turn by turn (the true earlier turns as history), the blind baseline it must beat, and which question
types have free-form answers."""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from vlmpipe.data.conversations import QADataset, frame_conversations
from vlmpipe.data.qa import qa_pairs
from vlmpipe.scoring.heldout import exact_match, predict_turns, teacher_forced_totals
from vlmpipe.scoring.metrics import BlindBaseline, normalize_answer

# A question type's answers are free-form when they take more than this many distinct (normalised)
# values, or average more than FREE_FORM_WORDS words: a class, yes/no, a colour or a count (every
# generated type) stays far below both; sentences such as "The image is blurry." do not.
FREE_FORM_ANSWERS = 30
FREE_FORM_WORDS = 3.0


@torch.no_grad()
def qa_scores(model, data: QADataset, batch_size: int = 64, questions: Sequence[tuple[int, int]] = (),
              answers: list[str] | None = None) -> dict[str, float]:
    """``val_loss`` (mean NLL per answer/EOS token over ``data``), ``val_answer_acc`` (teacher-forced:
    every token of the answer and its EOS is the argmax) and, for ``questions`` ((conversation,
    turn) pairs), ``exact_match`` of the greedy answers, normalised (lower-case, no punctuation
    or articles). The greedy answers replace the contents of ``answers`` when one is given."""
    out = teacher_forced_totals(model, data, batch_size)
    if questions:
        preds = predict_turns(model, data, questions, batch_size)
        if answers is not None:
            answers[:] = preds
        out["exact_match"] = exact_match(preds, [data.conversations[i][j][1] for i, j in questions])
    return out


def free_form_types(df) -> list[str]:
    """The question types of the Q/A CSV ``df`` whose answers are free-form (``FREE_FORM_ANSWERS``)."""
    answers: dict[str, list[str]] = defaultdict(list)
    for _, _, _, a, t in qa_pairs(df):
        answers[t].append(normalize_answer(a))
    return sorted(t for t, a in answers.items()
                  if len(set(a)) > FREE_FORM_ANSWERS or sum(len(x.split()) for x in a) / len(a) > FREE_FORM_WORDS)


def blind_baseline(df) -> BlindBaseline:
    """The most frequent training answer per question (and type): what a model that ignores the image gets."""
    _, convs, types = frame_conversations(df, "train")
    return BlindBaseline((q, a, t) for c, ts in zip(convs, types) for (q, a), t in zip(c, ts))
