"""The ``chat`` section: train_gpt2_chat."""
from __future__ import annotations

from dataclasses import dataclass, field

from vlmpipe.core.params import TrainParams, check


@dataclass
class ChatParams:
    """train_gpt2_chat: the captioner continued on the conversations (vlmpipe/chat/stage.py)."""

    # Text tokens per training window (the image prefix not counted); 0: all the LM's positions
    # left after the prefix. Whole turns that do not fit are dropped from the front.
    max_seq_len: int = 0
    max_new_tokens: int = 32
    # Held-out assistant turns answered by greedy generation after each epoch (exact match); 0: none.
    eval_turns: int = 300
    train: TrainParams = field(default_factory=lambda: TrainParams(epochs=3, batch_size=16, lr=2e-3,
                                                                   warmup_ratio=0.05, checkpoint_every=100))

    def validate(self, key: str) -> None:
        check(self.max_seq_len == 0 or self.max_seq_len >= 16, f"{key}.max_seq_len", "must be 0 (all) or >= 16")
        check(self.max_new_tokens >= 1, f"{key}.max_new_tokens", "must be >= 1")
        check(self.eval_turns >= 0, f"{key}.eval_turns", "must be >= 0")
