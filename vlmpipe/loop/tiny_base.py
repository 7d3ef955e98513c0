"""The offline default's stand-in for a hub language model.

A tiny Phi or GPT-2 with a byte-level BPE trained on the stage's own texts and a short
full-precision language-model warm-up on them — the offline analogue of pretraining: a random-init
base frozen in 4-bit learns very slowly through LoRA alone — saved like a hub checkpoint, so the
training stages load it with ``from_pretrained`` exactly as they load hub weights. Deterministic:
a resumed stage rebuilds the same base.
"""
from __future__ import annotations

import functools
import logging
import random
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from vlmpipe.core.io import scratch_dir
from vlmpipe.models.lm.tiny_lm import MAX_POSITIONS, new_tiny_lm, save_tiny_lm
from vlmpipe.core.params import TinyLMParams, TrainParams
from vlmpipe.loop.train import TrainTask, fit

log = logging.getLogger(__name__)


class _CausalLMTask(nn.Module):
    """A plain causal LM in the shared loop's contract: batch -> {loss, samples, tokens}."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, batch: dict) -> dict:
        out = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return {"loss": out.loss, "samples": batch["input_ids"].shape[0], "tokens": batch["attention_mask"].sum()}

    def train_flops(self, batch: dict) -> int:
        return self._cost.train_flops(*batch["input_ids"].shape)

    @functools.cached_property
    def _cost(self):
        from vlmpipe.core.flops import TransformerCost

        return TransformerCost.of_hf(self.lm)


class _WarmupTexts(torch.utils.data.Dataset):
    """``n`` texts drawn (with replacement, seeded) from ``texts``, EOS appended."""

    def __init__(self, tok, texts: Sequence[str], n: int, seed: int) -> None:
        rng = random.Random(seed)
        self.tok, self.texts = tok, [texts[rng.randrange(len(texts))] + tok.eos_token for _ in range(n)]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> str:
        return self.texts[i]

    def collate(self, batch: list[str]) -> dict:
        enc = self.tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=MAX_POSITIONS)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}


def build(kind: str, p: TinyLMParams, texts: Sequence[str], out_dir: str | Path, seed: int,
          batch_size: int = 32, device: str = "auto") -> Path:
    """Train a tokenizer on ``texts``, build a tiny ``kind`` ("phi" / "gpt2") model, warm it up on the
    texts through the shared loop (cosine decay, no ramp: it should end settled), save it to ``out_dir``.
    Under torchrun every rank calls this: the warm-up trains data-parallel, so all ranks save the same base."""
    texts = list(texts)
    model, tok = new_tiny_lm(kind, p, texts, seed)
    last_loss = None
    if p.warmup_steps > 0:
        data = _WarmupTexts(tok, texts, p.warmup_steps * batch_size, seed)
        cfg = TrainParams(epochs=1, batch_size=batch_size, lr=p.warmup_lr, weight_decay=0.0, warmup_ratio=0.0,
                          grad_clip=1.0, checkpoint_every=0, device=device, precision="fp32")
        with scratch_dir(Path(out_dir).parent, "warmup") as tmp:
            res = fit(TrainTask(f"tiny {kind} warm-up", _CausalLMTask(model), data, data.collate), cfg, seed=seed,
                      ckpt_dir=tmp / "ckpt", report_dir=tmp / "reports", identity={"tiny_lm": kind, "params": vars(p)})
        model.eval()
        last_loss = res.final_loss
        log.info("tiny %s: LM warm-up %d steps, final loss %.3f", kind, p.warmup_steps, last_loss)
    meta = {"kind": kind, "params": vars(p), "seed": seed, "n_params": sum(t.numel() for t in model.parameters()),
            "warmup_final_loss": last_loss}
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return save_tiny_lm(model, tok, out_dir, meta)
    # Under torchrun transformers saves on rank 0 only: every rank loads what rank 0 wrote (the same
    # weights: the warm-up trained data-parallel), from rank 0's folder, which lives until its stage ends.
    where = [str(save_tiny_lm(model, tok, out_dir, meta)) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(where, src=0)
    return Path(where[0])
