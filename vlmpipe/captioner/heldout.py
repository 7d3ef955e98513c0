"""The captioner on held-out images during training: validation loss per caption token, and a few
captions logged beside their references."""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from vlmpipe.scoring.heldout import validation_loss

log = logging.getLogger(__name__)


def caption_evaluator(val, feats: torch.Tensor, refs: Sequence[Sequence[str]], show: int = 3,
                      batch_size: int = 128):
    """``evaluate(model, epoch)`` for ``vlmpipe.train.fit``: val loss (+ a few captions logged)."""

    def evaluate(model, epoch: int) -> dict[str, float]:
        metrics = {"val_loss": validation_loss(model, val, batch_size)}
        if show:
            for cap, ref in zip(model.caption(feats[:show]), refs[:show]):
                log.info("epoch %d sample: %r | reference: %r", epoch, cap, ref[0])
        return metrics

    return evaluate
