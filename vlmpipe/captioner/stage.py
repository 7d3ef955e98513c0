"""The body of train_gpt2_captioner: the captioner on the cached COCO features and their captions."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vlmpipe.data import features as embeddings
from vlmpipe.core import hub
from vlmpipe.data.captions import CaptionDataset, caption_split
from vlmpipe.core.errors import UserError
from vlmpipe.captioner.heldout import caption_evaluator
from vlmpipe.core.io import relative_path, scratch_dir
from vlmpipe.models.captioner import build_captioner
from vlmpipe.core.params import to_dict
from vlmpipe.loop import tiny_base
from vlmpipe.core.runtime import barrier, is_main_process
from vlmpipe.loop.train import FitResult, TrainTask, fingerprint, fit, mfu_text

log = logging.getLogger(__name__)


def run_stage(cp, *, seed: int, coco_root: Path, embeddings_root: Path, siglip_dir: Path, out_dir: Path,
              ckpt_dir: Path, report_dir: Path, run: Any = None, show: int = 5) -> FitResult:
    """The captioner (``CaptionerParams`` ``cp``) on the cached COCO features and their captions.

    With ``vision_encoder: siglip`` the cache must come from the trained tower in ``siglip_dir``,
    whose location (relative to ``out_dir``) is recorded so new images are featurised alike.
    """
    expected = embeddings.siglip_identity(siglip_dir) if cp.vision_encoder == "siglip" else None
    _, train_feats, train_caps, encoder = caption_split(coco_root, embeddings_root, "train", expected, cp.regions)
    if encoder["name"] != cp.vision_encoder:
        raise UserError(f"{embeddings_root}: coco features were made by {encoder['name']!r}, but "
                        f"captioner.vision_encoder is {cp.vision_encoder!r} (run `dvc repro precompute_embeddings`)")
    _, val_feats, val_caps, _ = caption_split(coco_root, embeddings_root, "val", encoder, cp.regions)
    if cp.vision_encoder == "siglip":
        encoder["path"] = relative_path(siglip_dir, out_dir)
    if cp.lm != "tiny":
        hub.warn_unpinned(cp.lm, cp.lm_revision, "captioner.lm_revision")
    with scratch_dir(ckpt_dir, "tiny-base") as tmp:  # a killed run's leftovers are removed next time
        lm_source: str | Path = cp.lm
        if cp.lm == "tiny":
            lm_source = tiny_base.build("gpt2", cp.tiny, [c for caps in train_caps for c in caps], tmp / "tiny_gpt2", seed)
        model = build_captioner(lm_source, encoder=encoder, feature_dim=int(train_feats.shape[-1]),
                                regions=cp.regions, prefix_tokens=cp.prefix_tokens, freeze_lm=cp.freeze_lm,
                                beam_size=cp.beam_size, max_caption_tokens=cp.max_caption_tokens, seed=seed,
                                lm_revision=cp.lm_revision, projector_hidden=cp.projector_hidden,
                                source_name="tiny" if cp.lm == "tiny" else None)
        barrier()  # every rank has loaded the base before rank 0's scratch folder (which holds it) goes
    train = CaptionDataset(train_feats, train_caps, model.tokenizer, cp.max_caption_tokens)
    val = CaptionDataset(val_feats, val_caps, model.tokenizer, cp.max_caption_tokens)
    log.info("captioner: %d train images -> %d samples (%d target tokens), %d val images -> %d samples; "
             "%.2fM trainable params (LM %s)", len(train_feats), len(train), train.num_tokens(), len(val_feats),
             len(val), sum(q.numel() for q in model.parameters() if q.requires_grad) / 1e6,
             "frozen" if cp.freeze_lm else "fine-tuned")
    task = TrainTask("captioner", model, train, model.pack,
                     evaluate=caption_evaluator(val, val_feats, val_caps, show=min(show, 3)))
    data_id = fingerprint(*[p for p in (Path(coco_root) / "annotations", Path(embeddings_root)) if p.exists()])
    res = fit(task, cp.train, seed=seed, ckpt_dir=ckpt_dir, report_dir=report_dir,
              identity={"captioner": to_dict(cp), "data": data_id}, run=run)
    if is_main_process():
        model.save(out_dir)
        if show:
            for cap, refs in zip(model.caption(val_feats[:show]), val_caps[:show]):
                log.info("val caption: %r | references: %s", cap, "; ".join(repr(r) for r in refs[:2]))
        log.info("captioner: val_loss %.4f, %.0f samples/s, %.0f tokens/s, MFU %s",
                 res.metrics.get("val_loss", float("nan")), res.samples_per_s, res.tokens_per_s, mfu_text(res.speed))
    return res
