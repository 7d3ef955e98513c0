"""The ClipCap-style captioner: a prefix LM on GPT-2 that captions from the image prefix alone.

- Vision: a frozen encoder's features, R per image (``regions``: 1 pooled vector, or 5 = the
  whole image + its four quadrants), read from the precomputed cache; the encoder never runs
  inside training and its weights are never saved with the captioner — its identity is
  (``config.encoder``), so new images are featurised the same way (``vlmpipe.face.api``).
- Projector: ClipCap's MLP from the [R, D] features to K prefix vectors.
- LM: GPT-2 — the hub ``gpt2`` (or any GPT-2 id or folder) or the tiny GPT-2 built offline —
  fine-tuned; ``freeze_lm`` trains the projector alone (the LM then stays in eval mode).
- Decoding: beam search through Hugging Face ``generate`` (``beam_size`` 1 is greedy), ranked
  by the length-normalised log-probability ``sum(log p) / length ** LENGTH_PENALTY`` with
  ``length`` counting the generated tokens and the EOS: with the exponent 1 the mean per-token
  log-probability, which removes the bias of raw sums towards short captions.

Saved: ``lm/`` holds the fine-tuned GPT-2 (``save_pretrained``, safetensors); a frozen hub LM
is not copied, its id and commit are recorded and it is loaded at that commit again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from vlmpipe.core import hub
from vlmpipe.core.errors import UserError
from vlmpipe.models.lm.prefix_lm import CONFIG_NAME, PrefixLM, PrefixLMConfig
from vlmpipe.models.lm.projector import PrefixProjector

LENGTH_PENALTY = 1.0
REBUILD = "run `dvc repro train_gpt2_captioner` (or `dvc checkout models/captioner`)"


class Captioner(PrefixLM):
    KIND, TITLE = "captioner", "captioner"

    def __init__(self, lm: nn.Module, projector: PrefixProjector, tokenizer, config: PrefixLMConfig) -> None:
        super().__init__(lm, projector, tokenizer, config)
        if self.freeze_lm:
            self.lm.requires_grad_(False)

    @property
    def freeze_lm(self) -> bool:
        return bool(self.config.extra.get("freeze_lm", False))

    def train(self, mode: bool = True) -> "Captioner":
        super().train(mode)
        if self.freeze_lm:
            self.lm.eval()  # a frozen LM keeps inference behaviour (no dropout)
        return self

    def caption(self, feats: torch.Tensor, beam_size: int | None = None, max_tokens: int | None = None,
                batch_size: int = 64) -> list[str]:
        """Captions for features [N, R, D], ``batch_size`` images at a time (beam search; 1: greedy)."""
        feats = torch.as_tensor(feats)
        out: list[str] = []
        for start in range(0, len(feats), batch_size):
            ids = self.generate(feats[start:start + batch_size], num_beams=beam_size, max_new_tokens=max_tokens)
            out += [self.decode(x) for x in ids]
        return out

    def save_lm(self, d: Path) -> None:
        if self.freeze_lm and self.config.lm_source != "tiny" and not hub.is_local(self.config.lm_source):
            return  # a frozen hub LM: referenced by id and commit, its weights not copied
        self.lm.save_pretrained(d / "lm", safe_serialization=True)

    @classmethod
    def load_lm(cls, d: Path, config: PrefixLMConfig, device: torch.device) -> nn.Module:
        from transformers import AutoModelForCausalLM

        key = f"{d / CONFIG_NAME} lm_source"
        if (d / "lm" / "config.json").is_file():
            lm = hub.load(AutoModelForCausalLM, d / "lm", "main", key, dtype=torch.float32)
        elif config.extra.get("freeze_lm") and config.lm_source != "tiny":
            lm = hub.load(AutoModelForCausalLM, config.lm_source, config.lm_revision or "main", key, dtype=torch.float32)
        else:
            raise UserError(f"{d / 'lm'}: missing (the captioner's language model); {REBUILD}")
        return lm.to(device)


def build_captioner(lm_source: str | Path, *, encoder: Mapping, feature_dim: int, regions: int, prefix_tokens: int,
                    freeze_lm: bool, beam_size: int, max_caption_tokens: int, seed: int = 0,
                    lm_revision: str = "main", projector_hidden: int = 0, source_name: str | None = None) -> Captioner:
    """A fresh captioner: the LM from ``lm_source`` (a hub id at ``lm_revision``, or a folder) and a new
    projector (seeded). ``source_name``: what to record as the LM's source ("tiny" for a tiny base
    built in a scratch folder; default: ``lm_source``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = hub.load(AutoModelForCausalLM, lm_source, lm_revision, "captioner.lm", dtype=torch.float32)
    commit = hub.resolved_commit(lm_source, lm_revision)
    tok = hub.load(AutoTokenizer, lm_source, commit or lm_revision, "captioner.lm")
    hidden = int(lm.get_input_embeddings().weight.shape[1])
    with torch.random.fork_rng():  # seeded init that leaves the caller's RNG stream alone
        torch.manual_seed(seed)
        projector = PrefixProjector(feature_dim, regions, prefix_tokens, hidden, projector_hidden or None)
    name = source_name or str(lm_source)
    config = PrefixLMConfig(
        kind=Captioner.KIND, lm_source=name,
        lm_revision=None if name == "tiny" or hub.is_local(lm_source) else (commit or lm_revision),
        feature_dim=int(feature_dim), regions=int(regions), prefix_tokens=int(prefix_tokens),
        max_new_tokens=int(max_caption_tokens), num_beams=int(beam_size), length_penalty=LENGTH_PENALTY,
        encoder=dict(encoder), extra={"freeze_lm": bool(freeze_lm)})
    return Captioner(lm, projector, tok, config)


def load_captioner(directory: str | Path = "models/captioner", device: str | torch.device = "cpu") -> Captioner:
    """The saved captioner in one call (LM, tokenizer, projector, config), in eval mode."""
    return Captioner.load(directory, device, rebuild=REBUILD)
