"""Tiny Phi and GPT-2 language models built offline in place of hub weights.

The offline default cannot download ``microsoft/phi-2`` or ``gpt2``. Instead it
trains a byte-level BPE on the project's texts, builds a small configuration of
the same architecture and writes it with ``save_pretrained``; training stages
load it back with ``from_pretrained`` — 4-bit quantization included — exactly
as they load hub weights. (Before it is saved, ``vlmpipe.loop.tiny_base`` gives it a
short full-precision language-model warm-up on those texts: the offline
analogue of pretraining, since a random-init base frozen in 4-bit learns very
slowly through LoRA alone.)
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, PhiConfig, PreTrainedTokenizerFast

from vlmpipe.core.io import atomic_path, write_json
from vlmpipe.core.params import TinyLMParams
from vlmpipe.core.text import save_tokenizer, train_bpe_tokenizer

log = logging.getLogger(__name__)

MAX_POSITIONS = 256
# GPT-2's and Phi-2's own activation, gelu_new, is the tanh approximation written out in seven tensor
# operations, each with its backward; torch's gelu(approximate="tanh") is the same function (equal to
# ~1e-7) in one kernel. Measured on a 2-core AMD EPYC (Zen 4), the chat model's training step is 1.29x
# faster (benchmarks/bench_lm_step.py). The hub models keep the activation their configs name.
ACTIVATION = "gelu_pytorch_tanh"


def tiny_config(kind: str, p: TinyLMParams, tok: PreTrainedTokenizerFast):
    """A small config of the real architecture; module names match the hub model's."""
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if kind == "phi":
        return PhiConfig(hidden_size=p.hidden_size, intermediate_size=4 * p.hidden_size,
                         num_hidden_layers=p.layers, num_attention_heads=p.heads, hidden_act=ACTIVATION,
                         max_position_embeddings=MAX_POSITIONS, resid_pdrop=0.0, embd_pdrop=0.0,
                         attention_dropout=0.0, tie_word_embeddings=False, **common)
    if kind == "gpt2":
        return GPT2Config(n_embd=p.hidden_size, n_layer=p.layers, n_head=p.heads, activation_function=ACTIVATION,
                          n_positions=MAX_POSITIONS, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, **common)
    raise ValueError(f"unknown tiny LM kind {kind!r}")


def new_tiny_lm(kind: str, p: TinyLMParams, tokenizer_texts: Sequence[str], seed: int):
    """(a random-init tiny ``kind`` model, its byte-level BPE trained on ``tokenizer_texts``); seeded."""
    texts = list(tokenizer_texts)
    if not texts:
        raise ValueError("a tiny LM needs texts to train its tokenizer on")
    tok = train_bpe_tokenizer(texts, p.vocab_size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, p, tok))
    log.info("tiny %s: %.2fM parameters, vocab %d", kind, sum(t.numel() for t in model.parameters()) / 1e6, len(tok))
    return model, tok


def save_tiny_lm(model: nn.Module, tok: PreTrainedTokenizerFast, out_dir: str | Path, meta: dict) -> Path:
    """Write ``out_dir`` so that it loads with ``from_pretrained`` like any hub checkpoint."""
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tok, tmp)
        write_json(Path(tmp) / "vlmpipe_tiny_lm.json", meta)
    return Path(out_dir)
