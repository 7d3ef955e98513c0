"""train_gpt2_captioner: a ClipCap-style captioner (frozen features → MLP prefix → GPT-2).

Reads:  data/embeddings (the cached COCO features of ``captioner.vision_encoder``,
        ``captioner.regions`` per image: no image encoder runs here), data/coco
        (reference captions), models/siglip (only its weights hash, to refuse a
        stale cache, when the encoder is "siglip"), params ``seed`` and ``captioner``.
Writes: models/captioner/ (LM + tokenizer + projector + config; load with
        ``vlmpipe.models.captioner.load_captioner``), models/checkpoints/captioner/
        (resumed automatically), reports/captioner/{train_curve,val_curve}.csv
        and metrics.json (validation loss per epoch, throughput).

For ``captioner.lm: tiny`` the GPT-2 is built here first (tokenizer trained on the training
captions, seeded, deterministic); otherwise ``captioner.lm`` is a hub id (at
``captioner.lm_revision``) or a folder. Runs as ``python stages/train_gpt2_captioner.py`` or
under ``torchrun`` (DDP; rank 0 writes).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from vlmpipe.pipeline import train_captioner
from vlmpipe.errors import stage_entry
from vlmpipe.params import flatten, load_params, to_dict
from vlmpipe import registry
from vlmpipe.runtime import seed_everything
from vlmpipe.sources import preflight
from vlmpipe.tracking import stage_run
from vlmpipe.train import mfu_text, setup_distributed, shutdown_distributed

COCO, EMBEDDINGS, SIGLIP = Path("data/coco"), Path("data/embeddings"), Path("models/siglip")
OUT, CKPT, REPORTS = Path("models/captioner"), Path("models/checkpoints/captioner"), Path("reports/captioner")
log = logging.getLogger("train_gpt2_captioner")


@stage_entry
def main() -> None:
    t0 = time.perf_counter()
    p = load_params()
    preflight("train_gpt2_captioner", p)  # anything this or a later stage cannot fetch: one line now
    rank, world, _ = setup_distributed(p.captioner.train.device, "captioner.train.device")
    seed_everything(p.seed)
    params = {**flatten({"captioner": to_dict(p.captioner)}), "seed": p.seed}
    with stage_run("train_gpt2_captioner", params, enabled=rank == 0) as run:
        res = train_captioner.run_stage(p.captioner, seed=p.seed, coco_root=COCO, embeddings_root=EMBEDDINGS,
                                       siglip_dir=SIGLIP, out_dir=OUT, ckpt_dir=CKPT, report_dir=REPORTS, run=run)
        if rank == 0:
            run.log_artifact(OUT / "model.json")
            registry.log_model(run, "captioner", OUT)
            log.info("captioner done in %.0fs (%d ranks): val_loss %.4f, %.0f samples/s, %.0f tokens/s, MFU %s",
                     time.perf_counter() - t0, world, res.metrics.get("val_loss", float("nan")),
                     res.samples_per_s, res.tokens_per_s, mfu_text(res.speed))
    shutdown_distributed()


if __name__ == "__main__":
    raise SystemExit(main())
