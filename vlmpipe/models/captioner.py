"""ClipCap-style captioner: frozen image features → MLP prefix → GPT-2 → caption.

The model
---------
- Vision: a frozen encoder's features, R per image (``regions``: 1 pooled
  vector, or 5 = whole image + its four quadrants). Training reads them from the
  precomputed cache (``vlmpipe.embeddings``); the encoder never runs inside the
  training loop and its weights are never written into a checkpoint or into
  the saved captioner. The saved config records the encoder's *identity*
  instead, and ``caption_files`` featurizes new images with that same encoder
  and region scheme through ``vlmpipe.embeddings``.
- Projector: ``PrefixProjector`` (an MLP, as ClipCap's) maps the [R, D]
  features to K prefix vectors in the LM's hidden size.
- LM: GPT-2 — the hub ``gpt2`` (or any GPT-2 path) or the tiny GPT-2 built
  offline by ``vlmpipe.models.tiny_lm`` — loaded with ``from_pretrained`` and
  fine-tuned. ``freeze_lm`` trains the projector alone.

Data and loss
-------------
Every reference caption is a sample: an image with five captions gives five
samples, each pairing the image's features with one caption. A caption is
tokenized without special tokens, cut to ``max_caption_tokens - 1`` tokens and
followed by the EOS id, so every target sequence ends in EOS and generation
learns to stop. The LM input is ``[K prefix vectors][caption tokens + EOS]``;
labels are the caption tokens and EOS, ``-100`` on the prefix and the padding.
``collate`` pads each batch on the right to its longest caption (dynamic
padding). Shuffling is the training loop's (its sampler).

Decoding
--------
``generate`` is a small beam search over ``inputs_embeds`` with the KV cache
(``beam_size`` 1 is greedy: the same code takes the best token at each step).
Hypotheses are ranked by their **length-normalised log-probability**

    score = sum(log p(token)) / length ** LENGTH_PENALTY      (LENGTH_PENALTY = 1.0)

where ``length`` counts the generated tokens including the final EOS: with
the exponent 1 this is the mean per-token log-probability, which removes the
bias of raw sums towards short captions (the same rule as Hugging Face's
``length_penalty=1.0``). An image's search ends when it has ``beam_size``
finished hypotheses (ended by EOS; an EOS only counts while it ranks among the
top ``beam_size`` candidates of the step, as in Hugging Face's beam scorer),
or at ``max_tokens`` generated tokens, where the live beams are finished
without EOS. No sampling, ties broken by ``topk``'s order: deterministic.

Saved layout (``Captioner.save``; ``load_captioner(dir)`` returns a ready model)::

    captioner.json            encoder identity, regions, prefix tokens, beam size,
                              max tokens, LM source, tokenizer ids
    projector.json/.safetensors
    lm/                       GPT-2 (save_pretrained, safetensors) + tokenizer

With ``freeze_lm`` and a hub/path LM, ``lm/`` holds only the tokenizer and the
config names the LM to load (frozen weights are not copied into the output).
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmpipe.errors import UserError
from vlmpipe.io import atomic_path, read_image, read_json_file, write_json
from vlmpipe.models.projector import PrefixProjector

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
LENGTH_PENALTY = 1.0
CONFIG_NAME = "captioner.json"
LM_DIR = "lm"
FORMAT_VERSION = 1


# --- data ---------------------------------------------------------------------------


def encode_captions(tokenizer, captions: Sequence[str], max_caption_tokens: int) -> list[list[int]]:
    """Token ids of each caption (no special tokens), cut to ``max_caption_tokens - 1``, + EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token")
    texts = [c.strip() for c in captions]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [list(t[: max_caption_tokens - 1]) + [eos] for t in ids]


class CaptionDataset(torch.utils.data.Dataset):
    """One sample per (image, reference caption): ``{"feats": [R, D], "input_ids": [T]}``.

    ``feats`` is the cached feature tensor [N, R, D] (any float dtype, kept as
    is: float16 from the cache is converted per batch), ``captions[i]`` the
    reference captions of image ``i``.
    """

    def __init__(self, feats: torch.Tensor, captions: Sequence[Sequence[str]], tokenizer,
                 max_caption_tokens: int) -> None:
        if len(feats) != len(captions):
            raise ValueError(f"{len(feats)} feature rows but {len(captions)} caption lists")
        self.feats = feats if feats.dim() == 3 else feats.unsqueeze(1)
        flat = [c for caps in captions for c in caps]
        owner = [i for i, caps in enumerate(captions) for _ in caps]
        self.items = list(zip(owner, encode_captions(tokenizer, flat, max_caption_tokens)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        img, ids = self.items[i]
        return {"feats": self.feats[img], "input_ids": torch.tensor(ids, dtype=torch.long)}

    def num_tokens(self) -> int:
        return sum(len(ids) for _, ids in self.items)


def collate(samples: Sequence[Mapping[str, torch.Tensor]], pad_token_id: int,
            prefix_tokens: int) -> dict[str, torch.Tensor]:
    """Stack features; pad captions on the right to the batch's longest (dynamic padding).

    Returns ``feats`` [B, R, D] float32, ``input_ids`` [B, T], ``attention_mask``
    [B, T] (1 on caption tokens + EOS) and ``labels`` [B, K + T]: ``-100`` on
    the K prefix positions and on padding, the token id elsewhere — so every
    row's last unmasked label is its EOS.
    """
    b = len(samples)
    lens = [len(s["input_ids"]) for s in samples]
    t = max(lens)
    ids = torch.full((b, t), pad_token_id, dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.long)
    labels = torch.full((b, prefix_tokens + t), IGNORE_INDEX, dtype=torch.long)
    for i, (s, n) in enumerate(zip(samples, lens)):
        ids[i, :n] = s["input_ids"]
        mask[i, :n] = 1
        labels[i, prefix_tokens:prefix_tokens + n] = s["input_ids"]
    feats = torch.stack([torch.as_tensor(s["feats"]) for s in samples]).float()
    return {"feats": feats, "input_ids": ids, "attention_mask": mask, "labels": labels}


# --- the model ----------------------------------------------------------------------


class Captioner(nn.Module):
    """``projector`` + ``lm`` (+ ``tokenizer``, ``info``: the saved config)."""

    def __init__(self, lm: nn.Module, tokenizer, projector: nn.Module, info: Mapping[str, Any]) -> None:
        super().__init__()
        self.lm = lm
        self.projector = projector
        self.tokenizer = tokenizer
        self.info = dict(info)
        if self.freeze_lm:
            self.lm.requires_grad_(False)

    # Settings, all recorded in ``info`` (and so in captioner.json).
    @property
    def freeze_lm(self) -> bool:
        return bool(self.info.get("freeze_lm", False))

    @property
    def prefix_tokens(self) -> int:
        return int(self.info["prefix_tokens"])

    @property
    def regions(self) -> int:
        return int(self.info["regions"])

    @property
    def beam_size(self) -> int:
        return int(self.info["beam_size"])

    @property
    def max_caption_tokens(self) -> int:
        return int(self.info["max_caption_tokens"])

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(self.eos_token_id if pad is None else pad)  # hub GPT-2 has no pad token

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    @property
    def collate_fn(self):
        return functools.partial(collate, pad_token_id=self.pad_token_id, prefix_tokens=self.prefix_tokens)

    def dataset(self, feats: torch.Tensor, captions: Sequence[Sequence[str]]) -> CaptionDataset:
        return CaptionDataset(feats, captions, self.tokenizer, self.max_caption_tokens)

    def train(self, mode: bool = True) -> "Captioner":
        super().train(mode)
        if self.freeze_lm:
            self.lm.eval()  # a frozen LM keeps inference behaviour (no dropout)
        return self

    def _embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def prefix(self, feats: torch.Tensor) -> torch.Tensor:
        feats = torch.as_tensor(feats).to(self.device, torch.float32)
        if feats.dim() == 2:
            feats = feats.unsqueeze(1)
        if feats.shape[1] != self.regions:
            raise ValueError(f"features have {feats.shape[1]} regions, the captioner expects {self.regions}")
        return self.projector(feats)

    def forward(self, batch: Mapping[str, torch.Tensor], reduction: str = "mean") -> dict[str, Any]:
        """Loss on caption tokens + EOS (mean per target token; ``reduction="sum"`` for exact averages).

        ``tokens`` counts the target tokens (caption + EOS) of the batch.
        """
        dev = self.device
        ids = batch["input_ids"].to(dev)
        mask = batch["attention_mask"].to(dev)
        labels = batch["labels"].to(dev)
        tok = self._embed_tokens(ids)
        prefix = self.prefix(batch["feats"]).to(tok.dtype)
        b, k = prefix.shape[:2]
        out = self.lm(inputs_embeds=torch.cat([prefix, tok], dim=1),
                      attention_mask=torch.cat([mask.new_ones(b, k), mask], dim=1), use_cache=False)
        # Position t predicts token t + 1: drop the last logit and the first label.
        logits = out.logits[:, :-1].float()
        target = labels[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction=reduction)
        n = int((target != IGNORE_INDEX).sum())
        return {"loss": loss, "samples": b, "tokens": n}

    # --- decoding --------------------------------------------------------------

    @torch.no_grad()
    def generate_ids(self, feats: torch.Tensor, beam_size: int | None = None,
                     max_tokens: int | None = None) -> list[list[int]]:
        """Token ids of the best hypothesis per image, EOS included when generation stopped."""
        beam = int(beam_size or self.beam_size)
        limit = int(max_tokens or self.max_caption_tokens)
        if beam < 1 or limit < 1:
            raise ValueError("beam_size and max_tokens must be >= 1")
        was_training = self.training
        self.eval()
        try:
            return _beam_search(self, feats, beam, limit)
        finally:
            self.train(was_training)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    # --- saving -------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """Write the captioner to ``directory`` atomically (all or nothing)."""
        with atomic_path(directory) as tmp:
            tmp.mkdir(parents=True)
            lm_dir = tmp / LM_DIR
            info = {k: v for k, v in self.info.items() if k != "model_dir"}
            info["format_version"] = FORMAT_VERSION
            if self.freeze_lm and info.get("lm_source") not in (None, "", "tiny", LM_DIR):
                # A frozen hub/path LM: record where it comes from, do not copy its weights.
                info["lm_weights"] = info["lm_source"]
            else:
                self.lm.save_pretrained(lm_dir, safe_serialization=True)
                info["lm_weights"] = LM_DIR
            self.tokenizer.save_pretrained(lm_dir)
            self.projector.save(tmp)
            write_json(tmp / CONFIG_NAME, info)


def _beam_search(model: Captioner, feats: torch.Tensor, beam: int, limit: int) -> list[list[int]]:
    """Batched beam search (``beam`` = 1: greedy); see the module docstring for the rules."""
    lm, eos = model.lm, model.eos_token_id
    prefix = model.prefix(feats)
    emb_dtype = model._embed_tokens(torch.zeros(1, 1, dtype=torch.long, device=model.device)).dtype
    b = prefix.shape[0]
    out = lm(inputs_embeds=prefix.to(emb_dtype), use_cache=True)
    cache = out.past_key_values
    logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]
    vocab = logp.shape[-1]
    # W beams per image, all starting from the prefix; only beam 0 is live at step 0
    # so the first step does not pick the same token W times.
    cache.batch_repeat_interleave(beam)
    logp = logp.repeat_interleave(beam, dim=0)  # [B*W, V]
    scores = torch.full((b, beam), float("-inf"), device=prefix.device)
    scores[:, 0] = 0.0
    tokens = torch.zeros((b, beam, 0), dtype=torch.long, device=prefix.device)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    done = [False] * b
    for step in range(limit):
        length = step + 1  # generated tokens in a hypothesis after this step
        cand = (scores.view(-1, 1) + logp).view(b, beam * vocab)
        top_s, top_i = cand.topk(2 * beam, dim=1)
        top_s, top_src, top_tok = top_s.tolist(), (top_i // vocab).tolist(), (top_i % vocab).tolist()
        new_scores = torch.zeros((b, beam), device=prefix.device)
        new_src = torch.zeros((b, beam), dtype=torch.long)
        new_tok = torch.full((b, beam), eos, dtype=torch.long)
        for i in range(b):
            if done[i]:
                continue  # rows keep decoding (no ragged batch) but are never read
            k = 0
            for rank, (s, src, t) in enumerate(zip(top_s[i], top_src[i], top_tok[i])):
                if t == eos:
                    if rank < beam:
                        hyp = tokens[i, src].tolist() + [eos]
                        finished[i].append((s / length ** LENGTH_PENALTY, hyp))
                else:
                    new_scores[i, k], new_src[i, k], new_tok[i, k] = s, src, t
                    k += 1
                    if k == beam:
                        break
            if len(finished[i]) >= beam:
                done[i] = True
        flat_src = (torch.arange(b).view(-1, 1) * beam + new_src).view(-1).to(prefix.device)
        new_tok = new_tok.to(prefix.device)
        n = tokens.shape[-1]
        tokens = torch.cat([tokens.reshape(b * beam, n)[flat_src].reshape(b, beam, n), new_tok.unsqueeze(-1)], dim=-1)
        scores = new_scores
        if all(done) or length == limit:
            break
        cache.reorder_cache(flat_src)
        out = lm(inputs_embeds=model._embed_tokens(new_tok.view(-1, 1)), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    results: list[list[int]] = []
    for i in range(b):
        hyps = finished[i]
        if not done[i]:  # out of budget: the live beams end here, without EOS
            n = tokens.shape[-1]
            hyps = hyps + [(float(scores[i, j]) / n ** LENGTH_PENALTY, tokens[i, j].tolist())
                           for j in range(beam) if scores[i, j] > float("-inf")]
        # max() keeps the first of equal scores: deterministic.
        results.append(max(hyps, key=lambda h: h[0])[1])
    return results


def generate(model: Captioner, feats: torch.Tensor, beam_size: int | None = None,
             max_tokens: int | None = None, batch_size: int = 64) -> list[str]:
    """Captions for features [N, R, D] (or [N, D] when R = 1), ``batch_size`` images at a time.

    ``beam_size`` (default: the model's) > 1 is beam search, 1 greedy;
    ``max_tokens`` (default: the model's ``max_caption_tokens``) caps the
    generated tokens, EOS included. Deterministic.
    """
    feats = torch.as_tensor(feats)
    out: list[str] = []
    for start in range(0, len(feats), batch_size):
        ids = model.generate_ids(feats[start:start + batch_size], beam_size, max_tokens)
        out.extend(model.decode(x) for x in ids)
    return out


# --- building and loading -------------------------------------------------------------


def load_lm(source: str | os.PathLike, revision: str = "main", key: str = "captioner.lm"):
    """GPT-2 and its tokenizer via ``from_pretrained`` (a hub id at ``revision``, or a directory)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vlmpipe import hub

    lm = hub.load(AutoModelForCausalLM, source, revision, key, dtype=torch.float32)
    return lm, hub.load(AutoTokenizer, source, hub.resolved_commit(source, revision) or revision, key)


def build_captioner(lm_source: str | os.PathLike, *, encoder: Mapping[str, Any], feature_dim: int,
                    regions: int, prefix_tokens: int, freeze_lm: bool, beam_size: int,
                    max_caption_tokens: int, seed: int = 0, lm_revision: str = "main",
                    projector_hidden: int = 0) -> Captioner:
    """A fresh captioner: the LM from ``lm_source`` (at ``lm_revision`` on the hub) and a new projector (seeded)."""
    from vlmpipe import hub

    lm, tok = load_lm(lm_source, lm_revision)
    hidden = int(lm.get_input_embeddings().weight.shape[1])
    with torch.random.fork_rng():  # seeded init that leaves the caller's RNG stream alone
        torch.manual_seed(seed)
        projector = PrefixProjector(feature_dim, regions, prefix_tokens, hidden, projector_hidden or None)
    info = dict(encoder=dict(encoder), feature_dim=int(feature_dim), regions=int(regions),
                prefix_tokens=int(prefix_tokens), freeze_lm=bool(freeze_lm), beam_size=int(beam_size),
                max_caption_tokens=int(max_caption_tokens), lm_source=str(lm_source),
                # The hub commit the LM started from (None for a folder): a frozen hub LM is loaded at it again.
                lm_revision=None if hub.is_local(lm_source) else (hub.resolved_commit(lm_source, lm_revision)
                                                                   or lm_revision),
                length_penalty=LENGTH_PENALTY)
    return Captioner(lm, tok, projector, info)


def load_captioner(directory: str | os.PathLike = "models/captioner", device: str | torch.device = "cpu") -> Captioner:
    """The saved captioner in one call (LM, tokenizer, projector, config), in eval mode."""
    from vlmpipe.runtime import resolve_device

    d = Path(directory)
    cfg = d / CONFIG_NAME
    rebuild = "run `dvc repro train_gpt2_captioner` (or `dvc checkout models/captioner`)"
    if not cfg.is_file():
        raise UserError(f"{d}: not a trained captioner ({CONFIG_NAME} missing; {rebuild})")
    info = read_json_file(cfg, rebuild)
    if info.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{cfg}: unsupported captioner format {info.get('format_version')!r}")
    need = [k for k in ("encoder", "regions", "prefix_tokens", "beam_size", "max_caption_tokens") if k not in info]
    if need or not isinstance(info.get("encoder"), dict):
        raise UserError(f"{cfg}: incomplete config (no {(need or ['encoder'])[0]}); {rebuild}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vlmpipe import hub

    weights = info.get("lm_weights", LM_DIR)
    key = f"{cfg} lm_weights"
    if not (d / LM_DIR).is_dir():
        raise UserError(f"{d / LM_DIR}: missing (the language model and tokenizer); {rebuild}")
    if weights == LM_DIR:
        lm = hub.load(AutoModelForCausalLM, d / LM_DIR, "main", key, dtype=torch.float32)
    else:  # a frozen hub LM, at the commit it was trained with
        lm = hub.load(AutoModelForCausalLM, weights, info.get("lm_revision") or "main", key, dtype=torch.float32)
    tok = hub.load(AutoTokenizer, d / LM_DIR, "main", key)
    model = Captioner(lm, tok, PrefixProjector.load(d), info)
    model.info["model_dir"] = str(d)
    dev = resolve_device(device) if isinstance(device, str) else device
    return model.to(dev).eval()



# --- training (the train_gpt2_captioner stage's body) -----------------------------------


def validation_loss(model: Captioner, data: CaptionDataset, batch_size: int = 128) -> float:
    """Mean loss per target token (caption tokens + EOS) over every sample of ``data``, in order."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                batch = model.collate_fn([data[i] for i in range(start, min(len(data), start + batch_size))])
                out = model(batch, reduction="sum")
                total += float(out["loss"])
                count += int(out["tokens"])
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("validation set has no target tokens")
    return total / count


def make_evaluator(val: CaptionDataset, feats: torch.Tensor, refs: Sequence[Sequence[str]],
                   show: int = 3, batch_size: int = 128):
    """``evaluate(model, epoch)`` for ``vlmpipe.train.fit``: val loss (+ a few captions logged)."""

    def evaluate(model: Captioner, epoch: int) -> dict[str, float]:
        metrics = {"val_loss": validation_loss(model, val, batch_size)}
        if show:
            for cap, ref in zip(generate(model, feats[:show]), refs[:show]):
                log.info("epoch %d sample: %r | reference: %r", epoch, cap, ref[0])
        return metrics

    return evaluate


def load_split(coco_root: str | os.PathLike, embeddings_root: str | os.PathLike, split: str,
               encoder: Mapping[str, str] | None, regions: int) -> tuple[torch.Tensor, list[list[str]], dict]:
    """Cached features [N, R, D], the reference captions of each image, and the encoder identity.

    ``encoder`` ({"name", "hash"}): a cache made by another encoder is refused (a stale cache).
    """
    from vlmpipe import embeddings
    from vlmpipe.data.coco import CocoCaptions

    cache = embeddings.load(embeddings_root, "coco", split, expect_encoder=dict(encoder) if encoder else None)
    feats = torch.as_tensor(cache.embeddings)
    if feats.dim() != 3 or feats.shape[1] != regions:
        raise UserError(f"{embeddings_root}: coco_{split} has features of shape {tuple(feats.shape)}, expected "
                        f"[N, {regions}, D] (captioner.regions); rerun `dvc repro precompute_embeddings`")
    coco = CocoCaptions(coco_root, split)
    known = set(coco.ids)
    ids = [int(i) for i in cache.ids]
    missing = [i for i in ids if i not in known]
    if missing:
        raise UserError(f"{embeddings_root}: coco_{split} has features of {len(missing)} images absent from "
                        f"{coco_root} (e.g. id {missing[0]}); rerun `dvc repro precompute_embeddings`")
    return feats, [coco.captions(i) for i in ids], dict(cache.encoder)


def train_captioner(cp, *, seed: int, coco_root: str | os.PathLike, embeddings_root: str | os.PathLike,
                    siglip_dir: str | os.PathLike, out_dir: str | os.PathLike, ckpt_dir: str | os.PathLike,
                    report_dir: str | os.PathLike, run: Any = None, show: int = 5):
    """Build (tiny LM: train its tokenizer on the training captions), train with the shared
    loop, write ``out_dir``; ``cp`` is a ``CaptionerParams``. Returns the ``FitResult``.

    ``siglip_dir`` is the trained SigLIP used when ``cp.vision_encoder`` is "siglip":
    its identity must match the cache's, and its location (relative to ``out_dir``)
    is recorded so ``caption_files`` featurizes new images with the same tower."""
    from vlmpipe.io import scratch_dir

    from vlmpipe.models.tiny_lm import build_tiny_lm
    from vlmpipe.params import to_dict
    from vlmpipe.train import TrainTask, fingerprint, fit, is_main_process

    expected = expected_encoder(cp.vision_encoder, siglip_dir)
    train_feats, train_caps, encoder = load_split(coco_root, embeddings_root, "train", expected, cp.regions)
    if encoder["name"] != cp.vision_encoder:
        raise UserError(f"{embeddings_root}: coco features were made by {encoder['name']!r}, but "
                        f"captioner.vision_encoder is {cp.vision_encoder!r} (run `dvc repro precompute_embeddings`)")
    val_feats, val_caps, _ = load_split(coco_root, embeddings_root, "val", encoder, cp.regions)
    if cp.vision_encoder == "siglip":  # where to find the tower again, relative to the saved model
        encoder["path"] = os.path.relpath(Path(siglip_dir).resolve(), Path(out_dir).resolve())
    from vlmpipe import hub

    if cp.lm != "tiny":
        hub.warn_unpinned(cp.lm, cp.lm_revision, "captioner.lm_revision")
    with scratch_dir(ckpt_dir, "tiny-base") as tmp:  # a killed run's leftovers are removed next time
        lm_source = cp.lm
        if cp.lm == "tiny":
            # Deterministic (sorted tokenizer texts, seeded init): a resumed run rebuilds the same base.
            lm_source = build_tiny_lm("gpt2", cp.tiny, [c for caps in train_caps for c in caps],
                                      Path(tmp) / "tiny_gpt2", seed)
        model = build_captioner(lm_source, encoder=encoder, feature_dim=int(train_feats.shape[-1]),
                                regions=cp.regions, prefix_tokens=cp.prefix_tokens, freeze_lm=cp.freeze_lm,
                                beam_size=cp.beam_size, max_caption_tokens=cp.max_caption_tokens, seed=seed,
                                lm_revision=cp.lm_revision, projector_hidden=cp.projector_hidden)
    model.info["lm_source"] = cp.lm  # "tiny" (weights saved with the model) or the hub id / path
    train = model.dataset(train_feats, train_caps)
    val = model.dataset(val_feats, val_caps)
    log.info("captioner: %d train images -> %d samples (%d target tokens), %d val images -> %d samples; "
             "%.2fM trainable params (LM %s)", len(train_feats), len(train), train.num_tokens(), len(val_feats),
             len(val), sum(q.numel() for q in model.parameters() if q.requires_grad) / 1e6,
             "frozen" if cp.freeze_lm else "fine-tuned")
    task = TrainTask("captioner", model, train, model.collate_fn,
                     evaluate=make_evaluator(val, val_feats, val_caps, show=min(show, 3)))
    data_id = fingerprint(*[p for p in (Path(coco_root) / "annotations", Path(embeddings_root)) if p.exists()])
    identity = {"captioner": to_dict(cp), "data": data_id}
    res = fit(task, cp.train, seed=seed, ckpt_dir=Path(ckpt_dir), report_dir=Path(report_dir),
              identity=identity, run=run)
    if is_main_process():
        model.save(out_dir)
        if show:
            for cap, refs in zip(generate(model, val_feats[:show]), val_caps[:show]):
                log.info("val caption: %r | references: %s", cap, "; ".join(repr(r) for r in refs[:2]))
    return res


# --- featurizing new images (the same encoder and regions as the cache) -----------------------


def expected_encoder(vision_encoder: str, siglip_dir: str | os.PathLike | None) -> dict | None:
    """The identity the cached COCO features must carry for ``captioner.vision_encoder``.

    "siglip": the trained tower in ``siglip_dir`` (name + weights hash, read from
    its file). A CLIP hub id or path: checked by name only here (hashing would
    mean loading the model); ``caption_files`` checks the hash when it loads it.
    """
    from vlmpipe import embeddings

    if vision_encoder == "siglip":
        return embeddings.siglip_identity(siglip_dir)
    return None


def _resolve_encoder_path(model: Captioner) -> Path:
    enc = model.info["encoder"]
    p = Path(enc.get("path") or "")
    if not enc.get("path"):
        raise UserError(f"{model.info.get('model_dir')}: the captioner records no location of its SigLIP encoder")
    return p if p.is_absolute() else Path(model.info.get("model_dir", ".")) / p


def image_encoder(model: Captioner):
    """``fn(list of PIL images) -> [b, R, D]``: the frozen encoder the captioner was trained on.

    Its weights hash must equal the one recorded at training time, so new images
    are featurized exactly like the cached training features.
    """
    from vlmpipe import embeddings

    enc, regions = model.info["encoder"], model.regions
    if enc["name"] == "siglip":
        from vlmpipe.models.siglip import load_siglip

        sdir = _resolve_encoder_path(model)
        if not (sdir / "model.safetensors").exists():
            raise UserError(f"{sdir}: the SigLIP model this captioner was trained with is missing "
                            f"(run `dvc repro train_siglip`)")
        tower = load_siglip(sdir, model.device)
        fn, ident = embeddings.siglip_encoder(tower, regions), embeddings.encoder_identity("siglip", tower.image_tower)
    else:
        fn, ident = embeddings.clip_encoder(enc["name"], regions, model.device, enc.get("revision") or "main",
                                            key=f"{model.info.get('model_dir')} encoder")
    if enc.get("hash") and ident["hash"] != enc["hash"]:
        raise UserError(f"{model.info.get('model_dir')}: its encoder {enc['name']} now has weights {ident['hash']}, "
                        f"but the captioner was trained on features of {enc['hash']} (retrain: `dvc repro`)")
    return fn


def caption_images(model: Captioner, images: Sequence, beam_size: int | None = None,
                   batch_size: int = 64) -> list[str]:
    """Captions of PIL images (or uint8 HxWx3 arrays), featurized like the training cache."""
    from vlmpipe import embeddings

    if not len(images):
        return []
    fn = image_encoder(model)
    if len(images) > batch_size:  # a progress bar only where there is progress to show
        feats = embeddings.embed_images(fn, images, batch_size, total=len(images), desc="featurize")
    else:
        with torch.no_grad():
            feats = fn(list(images)).float().cpu()
    return generate(model, feats, beam_size=beam_size, batch_size=batch_size)


def caption_files(model_dir: str | os.PathLike, paths: Sequence[str | os.PathLike],
                  beam_size: int | None = None, device: str = "auto") -> list[str]:
    """Caption image files with the saved captioner (``beam_size`` None: the trained default)."""
    if beam_size is not None and beam_size < 1:
        raise UserError(f"--beam-size: must be >= 1 (1 is greedy), got {beam_size}")
    from transformers.utils import logging as hf_logging

    images = [read_image(p) for p in paths]  # a bad file fails before any model loads
    quiet = not hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bars around a command's one-line answers
    try:
        model = load_captioner(model_dir, device)
    finally:
        if not quiet:
            hf_logging.enable_progress_bar()
    return caption_images(model, images, beam_size)
