"""The prefix language model: image features → projector → K prefix vectors → a causal LM.

Both language models of the pipeline are this one model, specialised in a few dozen lines:

- the QA model (``models/qa_model.py``): Phi-2 in 4-bit NF4 with LoRA adapters; it answers a
  question (a text prompt after the prefix), greedily;
- the captioner (``models/captioner.py``): GPT-2, fine-tuned or frozen; it captions from the
  prefix alone, with beam search.

``forward(batch)``: the LM reads ``[K prefix vectors][text tokens]``; the loss is the mean
cross-entropy on the target tokens only (``labels`` != ``IGNORE_INDEX``: answers or captions
and their EOS; never the prefix, questions or padding). Batches come from ``collate`` (padded, one
example a row: evaluation) or ``pack`` (several examples a row: training), ``vlmpipe/models/lm/collate.py``.

``generate(feats, prompts)``: Hugging Face ``generate`` over ``inputs_embeds``, each row laid
out ``[padding][prefix][prompt]`` (left padding, so every row's last position is its own).
Greedy or beam search (``num_beams``), ranked by length-normalised log-probability
(``length_penalty``), stopping at EOS or ``max_new_tokens`` (EOS counted). Deterministic.

Saved layout (``save``: atomic; ``load``: one call, one format check)::

    model.json              PrefixLMConfig + format
    projector.json/.safetensors
    tokenizer/
    lm/ and/or adapter/     what the specialisation saves of its LM
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmpipe.core import hub
from vlmpipe.models.lm.collate import IGNORE_INDEX, pack_collate, pad_collate
from vlmpipe.core.errors import UserError
from vlmpipe.core.io import atomic_path, read_json_file, write_json
from vlmpipe.core.text import save_tokenizer
from vlmpipe.models.lm.projector import PrefixProjector

log = logging.getLogger(__name__)

FORMAT = "vlmpipe-prefix-lm/1"
# Model types whose causal-LM logits are the output head applied to the last hidden state, nothing more.
PLAIN_HEAD = frozenset({"gpt2", "phi", "phi3", "llama", "mistral", "qwen2", "qwen3"})
CONFIG_NAME = "model.json"


@dataclass
class PrefixLMConfig:
    kind: str                  # "qa" or "captioner": which specialisation loads it
    lm_source: str             # hub id, or "tiny" (the base is saved inside the model folder)
    lm_revision: str | None    # the hub commit the LM came from; None for tiny or a folder
    feature_dim: int           # D of the cached image features
    regions: int               # R features per image
    prefix_tokens: int         # K
    max_new_tokens: int        # generation budget, EOS included
    num_beams: int             # 1: greedy
    length_penalty: float = 1.0
    max_prompt_tokens: int | None = None  # text tokens kept of a prompt (oldest turns dropped first)
    # The frozen encoder that made the features: {"name", "hash"[, "revision"][, "path"]}; "path"
    # (relative to the model folder) locates a trained SigLIP, so new images are featurised alike.
    encoder: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # the specialisation's settings (LoRA, 4-bit, template, ...)


class PrefixLM(nn.Module):
    """``projector`` + ``lm`` + ``tokenizer`` + ``config``; subclasses save and load their LM part."""

    KIND: ClassVar[str] = ""   # recorded in model.json; the class that loads it
    TITLE: ClassVar[str] = ""  # what messages call it

    def __init__(self, lm: nn.Module, projector: PrefixProjector, tokenizer, config: PrefixLMConfig) -> None:
        super().__init__()
        self.lm, self.projector, self.tokenizer, self.config = lm, projector, tokenizer, config
        self.model_dir: Path | None = None  # set by load
        # False: the loss takes the LM's own forward (every position's logits) even where the head
        # could run on the targets alone; the same loss, for comparing the two (tests, bench_lm_step.py).
        self.head_on_targets = True

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(self.tokenizer.eos_token_id if pad is None else pad)  # GPT-2 and Phi-2 have no pad token

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """A padded batch, one example a row (evaluation: ``text_logits`` reads it row by row)."""
        return pad_collate(examples, self.pad_token_id)

    def pack(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """A packed batch, several examples a row (training: the same loss with little padding), the rows as
        wide as this LM's cost model finds cheapest; under FlashAttention-2 all in one row, which its varlen
        kernel splits into the sequences (across several rows it would attend from one sequence to the next)."""
        if self._attention == "flash_attention_2":
            return pack_collate(examples, self.pad_token_id, self.config.prefix_tokens, one_row=True)
        return pack_collate(examples, self.pad_token_id, self.config.prefix_tokens,
                            cost=lambda rows, width: self._lm_cost.train_flops(rows, width))

    @property
    def _attention(self) -> str:
        """The LM's attention implementation ("sdpa", "eager", "flash_attention_2", ...)."""
        causal = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm  # under PEFT
        return str(getattr(causal.config, "_attn_implementation", None))

    # ---- training

    def _prefix(self, feats: torch.Tensor) -> torch.Tensor:
        feats = torch.as_tensor(feats).to(self.device, torch.float32)
        if feats.dim() == 2:
            feats = feats.unsqueeze(1)
        if feats.shape[1:] != (self.config.regions, self.config.feature_dim):
            raise ValueError(f"features of shape {tuple(feats.shape)}, the model expects "
                             f"[B, {self.config.regions}, {self.config.feature_dim}]")
        return self.projector(feats)

    def text_logits(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, T, V], labels [B, T]): row t of the logits predicts text token t (the first
        from the last prefix position), so logits and labels line up without a shift."""
        return self._text_logits(batch, targets_only=False)

    def _text_logits(self, batch: Mapping[str, torch.Tensor], targets_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``text_logits``; with ``targets_only``, (logits [N, V], labels [N]) of the N target positions
        alone: the LM head (and the loss) run on those rows only. The prompt and the padding need no
        logits, and in a conversation the targets are a fifth of the tokens: the chat model's step on
        a 2-core CPU is 1.12x faster (``benchmarks/bench_lm_step.py``; the head and the softmax over
        the vocabulary run on a fifth of the rows)."""
        dev = self.device
        ids, labels = batch["input_ids"].to(dev), batch["labels"].to(dev)
        tok = self.lm.get_input_embeddings()(ids)
        prefix = self._prefix(batch["feats"]).to(tok.dtype)
        # The target positions as indices, found where the batch was made (on the host: no device sync).
        targets = tuple(i.to(dev) for i in (batch["labels"] != IGNORE_INDEX).nonzero(as_tuple=True))
        if "position_ids" in batch:  # packed (pack_collate): the prefixes go into their slots
            if not targets_only:
                raise ValueError("a packed batch gives the target positions' logits only (text_logits: use collate)")
            if "has_image" in batch:
                prefix = prefix[batch["has_image"].to(dev)]
            width = tok.shape[-1]
            embeds = tok.reshape(-1, width).index_copy(0, batch["prefix_at"].to(dev), prefix.reshape(-1, width))
            # No attention mask: the position ids, restarting at each sequence, keep the sequences apart.
            inputs = dict(inputs_embeds=embeds.view_as(tok), position_ids=batch["position_ids"].to(dev),
                          use_cache=False)
            rows, cols = targets
            keep, read = (rows, cols - 1), targets  # each token is predicted from the position before it
        else:  # padded (pad_collate): [prefix][text] a row; row t of the text predicts text token t
            mask = batch["attention_mask"].to(dev)
            b, k = prefix.shape[:2]
            seen = mask.new_ones(b, k)
            if "has_image" in batch:  # a text-only example's text attends to no prefix
                seen = seen * batch["has_image"].to(dev, mask.dtype)[:, None]
            inputs = dict(inputs_embeds=torch.cat([prefix, tok], dim=1),
                          attention_mask=torch.cat([seen, mask], dim=1), use_cache=False)
            if targets_only:
                keep, read = (targets[0], targets[1] + k - 1), targets
            else:
                keep, read = (slice(None), slice(k - 1, -1)), (slice(None),)
        parts = self._split_head()
        if parts is None:  # an LM whose forward does more than head(body): its own logits, then the rows
            return self.lm(**inputs).logits[keep], labels[read]
        body, head = parts
        return head(body(**inputs).last_hidden_state[keep]), labels[read]

    def _split_head(self) -> tuple[nn.Module, nn.Module] | None:
        """(body, head) when the loss runs the head on the target rows alone; None: the LM's own forward."""
        return self._body_and_head if self.head_on_targets else None

    @functools.cached_property
    def _body_and_head(self) -> tuple[nn.Module, nn.Module] | None:
        """(the LM without its head, the head) where the LM's logits are exactly head(body(x)), as in
        GPT-2 and the Phi and Llama families; None for any other (soft-capped or scaled logits)."""
        causal = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm  # under PEFT
        if getattr(causal.config, "model_type", "") not in PLAIN_HEAD:
            return None
        return causal.base_model, causal.get_output_embeddings()

    def forward(self, batch: Mapping[str, torch.Tensor], reduction: str = "mean") -> dict[str, Any]:
        """Loss on the target tokens (mean per token; ``reduction="sum"`` for exact averages over many
        batches) of a padded or packed batch; ``tokens`` counts the text tokens, ``targets`` the target tokens."""
        logits, targets = self._text_logits(batch, targets_only=True)
        loss = F.cross_entropy(logits.float(), targets, reduction=reduction)
        # Counts stay on the device: reading them here would make the host wait for every step.
        tokens = batch["text_tokens"] if "position_ids" in batch else batch["attention_mask"].sum()
        return {"loss": loss, "samples": int(batch["feats"].shape[0]), "tokens": tokens,
                "targets": targets.new_tensor(targets.numel())}

    def train_flops(self, batch: Mapping[str, torch.Tensor]) -> int:
        """Model FLOPs of ``forward`` + backward on ``batch`` (``vlmpipe/core/flops.py``): the projector once
        per image region, the LM over every position of the rows (prefix, text and padding; packed or
        padded), its head over the target positions (or every position, for an LM whose logits come whole)."""
        from vlmpipe.core.flops import mlp_train_flops

        rows, t = batch["input_ids"].shape
        if "position_ids" not in batch:  # padded: the prefix sits outside input_ids
            t += self.config.prefix_tokens
        head_rows = int((batch["labels"] != IGNORE_INDEX).sum()) if self._split_head() is not None else None
        projector = mlp_train_flops(self.projector, int(batch["feats"].shape[0]) * self.config.regions)
        if "sequence_lengths" in batch:  # one row split by a varlen kernel: attention within each sequence
            if head_rows is None:  # the head on every position
                return projector + sum(self._lm_cost.train_flops(1, int(n)) for n in batch["sequence_lengths"])
            lm = sum(self._lm_cost.train_flops(1, int(n), head_rows=0) for n in batch["sequence_lengths"])
            return projector + lm + self._lm_cost.train_flops(0, 0, head_rows=head_rows)
        return projector + self._lm_cost.train_flops(rows, t, head_rows=head_rows)

    @functools.cached_property
    def _lm_cost(self):
        """The LM's cost model, read once, at the first step (after any adapters are in place)."""
        from vlmpipe.core.flops import TransformerCost

        return TransformerCost.of_hf(self.lm)

    # ---- generation

    @torch.no_grad()
    def generate(self, feats: torch.Tensor, prompts: Sequence[Sequence[int]] | None = None, *,
                 num_beams: int | None = None, max_new_tokens: int | None = None) -> list[list[int]]:
        """New token ids per row (EOS not included) after the prefix and ``prompts[i]`` (none: empty)."""
        from transformers import GenerationConfig

        beams = int(num_beams or self.config.num_beams)
        budget = int(max_new_tokens or self.config.max_new_tokens)
        if beams < 1 or budget < 1:
            raise ValueError("num_beams and max_new_tokens must be >= 1")
        was_training = self.training
        self.eval()
        try:
            prefix = self._prefix(feats)
            b, k, h = prefix.shape
            prompts = [list(p) for p in prompts] if prompts is not None else [[] for _ in range(b)]
            longest = max(len(p) for p in prompts)
            ids = torch.full((b, max(longest, 1)), self.pad_token_id, dtype=torch.long, device=prefix.device)
            for i, p in enumerate(prompts):
                if p:
                    ids[i, longest - len(p):] = torch.as_tensor(p, dtype=torch.long)
            tok = self.lm.get_input_embeddings()(ids)[:, :longest]
            embeds = torch.zeros((b, k + longest, h), dtype=tok.dtype, device=prefix.device)
            mask = torch.zeros((b, k + longest), dtype=torch.long, device=prefix.device)
            for i, p in enumerate(prompts):  # [padding][prefix][prompt]
                start = longest - len(p)
                embeds[i, start:start + k] = prefix[i].to(tok.dtype)
                embeds[i, start + k:] = tok[i, start:]
                mask[i, start:] = 1
            eos = int(self.tokenizer.eos_token_id)
            # A fresh generation config: nothing inherited from the hub model's (sampling, lengths).
            gen = GenerationConfig(max_new_tokens=budget, num_beams=beams, do_sample=False,
                                   length_penalty=self.config.length_penalty, early_stopping=beams > 1,
                                   eos_token_id=eos, pad_token_id=self.pad_token_id)
            out = self.lm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=gen)
        finally:
            self.train(was_training)
        rows = out.tolist()
        return [r[: r.index(eos)] if eos in r else r for r in rows]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    # ---- saving and loading

    def save_lm(self, directory: Path) -> None:
        raise NotImplementedError

    @classmethod
    def load_lm(cls, directory: Path, config: PrefixLMConfig, device: torch.device) -> nn.Module:
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> None:
        """Write the model to ``directory``, all or nothing."""
        with atomic_path(directory) as tmp:
            tmp.mkdir(parents=True)
            self.save_lm(tmp)
            self.projector.save(tmp)
            save_tokenizer(self.tokenizer, tmp / "tokenizer")
            write_json(tmp / CONFIG_NAME, {"format": FORMAT, **dataclasses.asdict(self.config)})

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu", *, rebuild: str = ""):
        """The saved model in one call (LM, projector, tokenizer, config), in eval mode on ``device``.

        Every damaged or missing part is one ``UserError`` naming the file and ``rebuild`` (what to run)."""
        from transformers import AutoTokenizer

        from vlmpipe.core.runtime import resolve_device

        d = Path(directory)
        cfg_path = d / CONFIG_NAME
        if not cfg_path.is_file():
            raise UserError(f"{d}: no trained {cls.TITLE} here ({CONFIG_NAME} missing; {rebuild})")
        raw = read_json_file(cfg_path, rebuild)
        if raw.pop("format", None) != FORMAT:
            raise UserError(f"{cfg_path}: not a {FORMAT} model config; {rebuild}")
        try:
            config = PrefixLMConfig(**raw)
        except TypeError as e:
            raise UserError(f"{cfg_path}: incomplete or unknown keys ({e}); {rebuild}") from None
        if config.kind != cls.KIND:
            raise UserError(f"{d}: a {config.kind} model, not a {cls.TITLE}")
        for part in ("tokenizer", "projector.json"):
            if not (d / part).exists():
                raise UserError(f"{d / part}: missing; {rebuild}")
        dev = resolve_device(device) if isinstance(device, str) else device
        projector = PrefixProjector.load(d)
        lm = cls.load_lm(d, config, dev)
        width = lm.get_input_embeddings().weight.shape[1]
        if projector.hidden_size != width:
            raise UserError(f"{cfg_path}: {config.lm_source}@{config.lm_revision} has hidden size {width}, but the "
                            f"projector was trained for {projector.hidden_size}: not the LM this model was trained on")
        tokenizer = hub.load(AutoTokenizer, d / "tokenizer", "main", str(d / "tokenizer"))
        model = cls(lm, projector.to(dev), tokenizer, config)
        model.model_dir = d
        return model.eval()

    def encoder_dir(self) -> Path:
        """Where the trained SigLIP that made the features lives (recorded relative to the model folder)."""
        rel = self.config.encoder.get("path")
        if not rel:
            raise UserError(f"{self.model_dir}: the model records no location of its image encoder")
        p = Path(rel)
        return p if p.is_absolute() else Path(self.model_dir or ".") / p
