"""The chat model on held-out conversations: loss per assistant token, and greedy exact match turn by
turn, with the true earlier turns as history and without them."""
from __future__ import annotations

from typing import Sequence

import torch

from vlmpipe.scoring.heldout import exact_match, teacher_forced_totals


def chat_answers(model, data, turns: Sequence[tuple[int, int]], history: bool = True,
                 batch_size: int = 64) -> list[str]:
    """Greedy replies to turn ``j`` of conversation ``i`` of a ``ChatDataset`` for each (i, j): after the
    true earlier turns (``history``), or with them removed (what the reply owes to the conversation)."""
    out: list[str] = []
    for s in range(0, len(turns), batch_size):
        chunk = turns[s:s + batch_size]
        feats = torch.stack([torch.as_tensor(data.feats[data.image_rows[i]]) for i, _ in chunk])
        out += model.answer(feats, [data.conversations[i][j][0] for i, j in chunk],
                            [data.conversations[i][:j] if history else [] for i, j in chunk])
    return out


@torch.no_grad()
def chat_scores(model, data, turns: Sequence[tuple[int, int]] = (), batch_size: int = 64) -> dict[str, float]:
    """``val_loss`` (mean NLL per assistant/EOS token over every window of ``data``) and, for ``turns``,
    ``exact_match`` of the greedy replies (normalised) with the true history."""
    out = {"val_loss": teacher_forced_totals(model, data, batch_size)["val_loss"]}
    if turns:
        out["exact_match"] = exact_match(chat_answers(model, data, turns, batch_size=batch_size),
                                         [data.conversations[i][j][1] for i, j in turns])
    return out
