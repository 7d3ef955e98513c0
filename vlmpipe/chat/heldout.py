"""The chat model on held-out conversations: loss per assistant token, and greedy exact match turn by
turn, with the true earlier turns as history and without them."""
from __future__ import annotations

from typing import Sequence

import torch

from vlmpipe.scoring.heldout import exact_match, predict_turns, teacher_forced_totals


@torch.no_grad()
def chat_scores(model, data, turns: Sequence[tuple[int, int]] = (), batch_size: int = 64,
                replies: list[str] | None = None) -> dict[str, float]:
    """``val_loss`` (mean NLL per assistant/EOS token over every window of ``data``) and, for ``turns``,
    ``exact_match`` of the greedy replies (normalised) with the true history; ``replies``, when given,
    receives those replies (so a caller that shows some need not generate them again)."""
    out = {"val_loss": teacher_forced_totals(model, data, batch_size)["val_loss"]}
    if turns:
        got = predict_turns(model, data, turns, batch_size)
        if replies is not None:
            replies[:] = got
        out["exact_match"] = exact_match(got, [data.conversations[i][j][1] for i, j in turns])
    return out
