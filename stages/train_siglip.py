"""train_siglip: contrastively train the SigLIP image and text towers (sigmoid loss).

Reads:  data/cifar (train split to train on, test split for held-out metrics),
        data/cifar_qa.csv (texts: class prompts, captions composed from the
        answers, "question answer" pairs), params ``seed`` and ``siglip``.
Writes: models/siglip/ (safetensors + config.json + tokenizer/, load with
        ``vlmpipe.models.siglip.load_siglip``), models/checkpoints/siglip/
        (resumed automatically), reports/siglip/{train_curve,val_curve}.csv
        and metrics.json (zero-shot accuracy and recall@1/5, each with its
        chance level).

Runs as ``python stages/train_siglip.py`` or under ``torchrun`` (DDP; rank 0 writes).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning (on a shared 2-core
# machine spinning threads made a 2-thread run ~10x slower than 1 thread).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from vlmpipe.pipeline import train_siglip  # noqa: E402
from vlmpipe.errors import stage_entry  # noqa: E402
from vlmpipe.params import flatten, load_params, to_dict  # noqa: E402
from vlmpipe import registry  # noqa: E402
from vlmpipe.runtime import seed_everything  # noqa: E402
from vlmpipe.sources import preflight  # noqa: E402
from vlmpipe.tracking import stage_run  # noqa: E402
from vlmpipe.train import mfu_text, setup_distributed, shutdown_distributed  # noqa: E402

CIFAR, CSV = Path("data/cifar"), Path("data/cifar_qa.csv")
OUT, CKPT, REPORTS = Path("models/siglip"), Path("models/checkpoints/siglip"), Path("reports/siglip")
log = logging.getLogger("train_siglip")


@stage_entry
def main() -> None:
    t0 = time.perf_counter()
    p = load_params()
    preflight("train_siglip", p)  # anything this or a later stage cannot fetch: one line now
    rank, world, _ = setup_distributed(p.siglip.train.device, "siglip.train.device")
    seed_everything(p.seed)
    with stage_run("train_siglip", {**flatten({"siglip": to_dict(p.siglip)}), "seed": p.seed}, enabled=rank == 0) as run:
        res = train_siglip.run_stage(p.siglip, seed=p.seed, cifar_root=CIFAR, csv_path=CSV, out_dir=OUT, ckpt_dir=CKPT,
                                    report_dir=REPORTS, run=run)
        if rank == 0:
            run.log_artifact(OUT / "config.json")
            registry.log_model(run, "siglip", OUT)
            m = res.metrics
            log.info("siglip done in %.0fs (%d ranks): zero-shot %.3f (chance %.3f), i2t R@1 %.3f, t2i R@1 %.3f "
                     "(chance %.3f); %.0f samples/s, MFU %s", time.perf_counter() - t0, world, m.get("zero_shot_acc", 0),
                     m.get("zero_shot_chance", 0), m.get("i2t_r1", 0), m.get("t2i_r1", 0), m.get("r1_chance", 0),
                     res.samples_per_s, mfu_text(res.speed))
    shutdown_distributed()


if __name__ == "__main__":
    raise SystemExit(main())
