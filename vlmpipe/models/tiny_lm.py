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
import math
import random
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, GPT2Config, PhiConfig, PreTrainedTokenizerFast

from vlmpipe.io import atomic_path, write_json
from vlmpipe.params import TinyLMParams
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


def _warmup(model: torch.nn.Module, tok: PreTrainedTokenizerFast, texts: Sequence[str],
            steps: int, lr: float, seed: int, batch_size: int = 32) -> float:
    """Plain next-token training on ``texts`` (each followed by EOS); returns the last loss."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss_val = float("nan")
    bar = tqdm(range(steps), desc="LM warm-up", leave=False)
    for step in bar:
        batch = [texts[rng.randrange(len(texts))] + tok.eos_token for _ in range(batch_size)]
        enc = tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=MAX_POSITIONS)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        # Cosine decay: the warm-up should end settled, not mid-jump.
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
        loss = model(**enc, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_val = loss.item()
        bar.set_postfix(loss=f"{loss_val:.3f}")
    model.eval()
    return loss_val


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
        last_loss = _warmup(model, tok, texts, p.warmup_steps, p.warmup_lr, seed)
        log.info("tiny %s: LM warm-up %d steps, final loss %.3f", kind, p.warmup_steps, last_loss)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(Path(tmp) / "vlmpipe_tiny_lm.json", {
            "kind": kind, "params": vars(p), "seed": seed, "n_params": n_params,
            "warmup_final_loss": last_loss,
        })
    return Path(out_dir)
