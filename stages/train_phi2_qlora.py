"""train_phi2_qlora: a Phi-2 visual QA model trained with QLoRA on SigLIP prefix tokens.

Reads:  data/cifar_qa.csv (+ data/cifar to validate it), data/embeddings/cifar_{train,test}
        (cached SigLIP features: no image encoder runs here), params ``seed``, ``lr``, ``phi2``.
Writes: models/phi2_vlm/ (PEFT adapter + projector + tokenizer + config, + the tiny base
        when ``phi2.base_model: tiny``; load with ``vlmpipe.models.qa_model.load_qa_model``),
        models/checkpoints/phi2_vlm/ (resumed automatically), reports/phi2_vlm/
        {train_curve,val_curve}.csv and metrics.json (held-out loss and answer exact
        match per epoch; the final exact match next to the blind baseline).

For ``phi2.base_model: tiny`` a small Phi is built first (tokenizer and a short LM warm-up on
the training conversations, seeded); otherwise ``phi2.base_model`` is a hub id (at
``phi2.revision``) or a folder under inputs/models. The learning rate is the top-level ``lr``.
Runs as ``python stages/train_phi2_qlora.py`` or under torchrun (``python -m vlmpipe.launch``): each
rank loads its base on ``cuda:LOCAL_RANK``, DDP over the adapters and projector, rank 0 writes.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from vlmpipe.pipeline import train_qa
from vlmpipe.errors import stage_entry
from vlmpipe.params import flatten, load_params, to_dict
from vlmpipe import registry
from vlmpipe.runtime import seed_everything
from vlmpipe.sources import preflight
from vlmpipe.tracking import stage_run
from vlmpipe.train import mfu_text, setup_distributed, shutdown_distributed

CSV, CIFAR, EMBEDDINGS = Path("data/cifar_qa.csv"), Path("data/cifar"), Path("data/embeddings")
SIGLIP = Path("models/siglip")
OUT, CKPT, REPORTS = Path("models/phi2_vlm"), Path("models/checkpoints/phi2_vlm"), Path("reports/phi2_vlm")
log = logging.getLogger("train_phi2_qlora")


@stage_entry
def main() -> None:
    t0 = time.perf_counter()
    p = load_params()
    preflight("train_phi2_qlora", p)  # anything this or a later stage cannot fetch: one line now
    rank, world, _ = setup_distributed(p.phi2.train.device, "phi2.train.device")
    seed_everything(p.seed)
    params = {**flatten({"phi2": to_dict(p.phi2)}), "seed": p.seed, "lr": p.lr}
    with stage_run("train_phi2_qlora", params, enabled=rank == 0) as run:
        res = train_qa.run_stage(p.phi2, seed=p.seed, csv_path=CSV, cifar_root=CIFAR, embeddings_root=EMBEDDINGS,
                                siglip_dir=SIGLIP, out_dir=OUT, ckpt_dir=CKPT, report_dir=REPORTS, run=run)
        m = res.metrics
        if rank == 0:
            run.log_artifact(OUT / "model.json")
            registry.log_model(run, "qa", OUT)
            log.info("phi2_vlm done in %.0fs (%d ranks): held-out exact match %.3f (blind baseline %.3f), "
                     "val_loss %.4f; %.0f tokens/s, MFU %s", time.perf_counter() - t0, world,
                     m.get("exact_match", float("nan")), m.get("blind_exact_match", float("nan")),
                     m.get("val_loss", float("nan")), res.tokens_per_s, mfu_text(res.speed))
    shutdown_distributed()


if __name__ == "__main__":
    raise SystemExit(main())
