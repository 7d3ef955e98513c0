"""Tiny Phi and GPT-2 language models built offline in place of hub weights.

The offline default cannot download ``microsoft/phi-2`` or ``gpt2``. Instead it
trains a byte-level BPE on the project's texts, builds a small configuration of
the same architecture, gives it a short full-precision language-model warm-up
on those texts (the offline analogue of pretraining: a random-init base frozen
in 4-bit learns very slowly through LoRA alone), and writes it with
``save_pretrained``. Training stages then load it back with ``from_pretrained``
— 4-bit quantization included — exactly as they load hub weights.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, PhiConfig, PreTrainedTokenizerFast

from vlmpipe.io import atomic_path, scratch_dir, write_json
from vlmpipe.params import TinyLMParams, TrainParams
from vlmpipe.text import train_bpe_tokenizer

log = logging.getLogger(__name__)

MAX_POSITIONS = 256


def tiny_config(kind: str, p: TinyLMParams, tok: PreTrainedTokenizerFast):
    """A small config of the real architecture; module names match the hub model's."""
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if kind == "phi":
        return PhiConfig(hidden_size=p.hidden_size, intermediate_size=4 * p.hidden_size,
                         num_hidden_layers=p.layers, num_attention_heads=p.heads,
                         max_position_embeddings=MAX_POSITIONS, resid_pdrop=0.0, embd_pdrop=0.0,
                         attention_dropout=0.0, tie_word_embeddings=False, **common)
    if kind == "gpt2":
        return GPT2Config(n_embd=p.hidden_size, n_layer=p.layers, n_head=p.heads,
                          n_positions=MAX_POSITIONS, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, **common)
    raise ValueError(f"unknown tiny LM kind {kind!r}")


class _CausalLMTask(nn.Module):
    """A causal LM in the shared loop's contract: batch -> {loss, samples, tokens}."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, batch: dict) -> dict:
        out = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return {"loss": out.loss, "samples": batch["input_ids"].shape[0], "tokens": int(batch["attention_mask"].sum())}


class _WarmupTexts(torch.utils.data.Dataset):
    """``steps * batch_size`` texts drawn (with replacement, seeded) from ``texts``, EOS appended."""

    def __init__(self, tok: PreTrainedTokenizerFast, texts: Sequence[str], n: int, seed: int) -> None:
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


def _warmup(kind: str, model: nn.Module, tok: PreTrainedTokenizerFast, texts: Sequence[str], p: TinyLMParams,
            seed: int, work_dir: Path, batch_size: int = 32) -> float:
    """Next-token training on ``texts`` through the shared loop (cosine decay, no warm-up ramp:
    the base should end settled, not mid-jump); returns the last step's loss."""
    from vlmpipe.train import TrainTask, fit

    data = _WarmupTexts(tok, texts, p.warmup_steps * batch_size, seed)
    cfg = TrainParams(epochs=1, batch_size=batch_size, lr=p.warmup_lr, weight_decay=0.0, warmup_ratio=0.0,
                      grad_clip=1.0, checkpoint_every=0, device="cpu")
    task = TrainTask(f"tiny {kind} warm-up", _CausalLMTask(model), data, data.collate)
    with scratch_dir(work_dir, "warmup") as tmp:
        res = fit(task, cfg, seed=seed, ckpt_dir=Path(tmp) / "ckpt", report_dir=Path(tmp) / "reports",
                  identity={"tiny_lm": kind, "params": vars(p)})
    model.eval()
    return res.final_loss


def build_tiny_lm(kind: str, p: TinyLMParams, texts: Sequence[str], out_dir: str | Path,
                  seed: int, tokenizer_texts: Sequence[str] | None = None) -> Path:
    """Train a tokenizer, build and warm up a tiny ``kind`` model, save it to ``out_dir``.

    ``out_dir`` then loads with ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` like any hub checkpoint.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("build_tiny_lm needs texts")
    tok = train_bpe_tokenizer(tokenizer_texts or texts, p.vocab_size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, p, tok))
    n_params = sum(t.numel() for t in model.parameters())
    log.info("tiny %s: %.2fM parameters, vocab %d", kind, n_params / 1e6, len(tok))
    last_loss = None
    if p.warmup_steps > 0:
        last_loss = _warmup(kind, model, tok, texts, p, seed, Path(out_dir).parent)
        log.info("tiny %s: LM warm-up %d steps, final loss %.3f", kind, p.warmup_steps, last_loss)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(Path(tmp) / "vlmpipe_tiny_lm.json", {
            "kind": kind, "params": vars(p), "seed": seed, "n_params": n_params,
            "warmup_final_loss": last_loss,
        })
    return Path(out_dir)
