"""Byte-level BPE tokenizers trained on the project's own texts.

The offline default has no hub tokenizer, so each tiny model gets one trained
on the texts it will see (captions, questions, answers). Byte-level BPE never
meets an unknown character, like GPT-2's and Phi-2's tokenizers. The vocab
must leave room beyond the 256 byte symbols: at ~400 entries common words
split into many tokens and short generation budgets cut answers off.
"""
from __future__ import annotations

import os
from typing import Iterable

from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|endoftext|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int,
                        special_tokens: tuple[str, ...] = (PAD, BOS, EOS)) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``; pad/bos/eos are set from ``special_tokens``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 512:
        raise ValueError("vocab_size must be >= 512 for a byte-level BPE")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Sorting makes the merge order independent of the caller's iteration order.
    tok.train_from_iterator(sorted(set(texts)), trainer=trainer)
    pad, bos, eos = special_tokens[0], special_tokens[1], special_tokens[2]
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, bos_token=bos,
                                   eos_token=eos, unk_token=None)


def save_tokenizer(tokenizer, directory: str | os.PathLike) -> None:
    """``tokenizer.save_pretrained(directory)`` without the padding and truncation of its last call.

    A fast tokenizer keeps the settings of the last call that padded or truncated, and writes them
    into ``tokenizer.json``: a model saved after training would differ from the same model saved by a
    run resumed at its last checkpoint (no call yet), and every stage after it would rerun. Every
    call passes its own settings, so the saved file leaves them out."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_padding()
        backend.no_truncation()
    tokenizer.save_pretrained(str(directory))
