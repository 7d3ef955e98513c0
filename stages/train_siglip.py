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

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On this shared 2-core
# machine, spinning threads fighting other processes made a 2-thread run ~10x slower than
# 1 thread (measured: 25 vs 300 images/s for the tower at load average 8; passive: 230).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from vlmpipe.errors import stage_entry  # noqa: E402

CIFAR, CSV = Path("data/cifar"), Path("data/cifar_qa.csv")
OUT, CKPT, REPORTS = Path("models/siglip"), Path("models/checkpoints/siglip"), Path("reports/siglip")
log = logging.getLogger("train_siglip")


@stage_entry
def main() -> None:
    t0 = time.perf_counter()
    from vlmpipe.data.cifar import load_split
    from vlmpipe.data.qa import read_qa_csv
    from vlmpipe.io import atomic_path
    from vlmpipe.models.siglip import (ImageTextPairs, build_siglip, image_texts, retrieval_captions,
                                       retrieval_metrics)
    from vlmpipe.params import flatten, load_params, to_dict
    from vlmpipe.runtime import seed_everything
    from vlmpipe.sources import preflight
    from vlmpipe.tracking import stage_run
    from vlmpipe.train import TrainTask, fingerprint, fit, setup_distributed, shutdown_distributed

    p = load_params()
    preflight("train_siglip", p)  # anything this or a later stage cannot fetch: one line now
    s = p.siglip
    rank, world, _ = setup_distributed(s.train.device, "siglip.train.device")
    seed_everything(p.seed)

    train, test = load_split(CIFAR, "train"), load_split(CIFAR, "test")
    df = read_qa_csv(CSV, CIFAR)
    tr, te = image_texts(df, "train", len(train), train.label_names), image_texts(df, "test", len(test), test.label_names)
    prompts = tr.prompts
    test_captions = retrieval_captions(te, test.labels)
    texts = prompts + [c for c in tr.captions if c] + [t for ts in tr.qa_texts for t in ts]

    model = build_siglip(s, texts)
    model.config["class_prompts"] = prompts
    data = ImageTextPairs(train.images, train.labels, prompts, tr.captions, tr.qa_texts, model.tokenizer,
                          s.text_max_tokens, p.seed)
    log.info("siglip: %d train images, %d distinct texts; %d test images (%d with complete captions); "
             "%.2fM trainable params", len(data), len(data.vocab), len(test), sum(map(bool, test_captions)),
             sum(q.numel() for q in model.parameters() if q.requires_grad) / 1e6)
    task = TrainTask(
        name="siglip", model=model, train_data=data, collate=data.collate,
        param_groups=lambda m, lr: m.param_groups(lr, s.train.weight_decay, s.logit_lr_mult),
        evaluate=lambda m, epoch: retrieval_metrics(m, test.images, test.labels, prompts, test_captions),
    )
    identity = {"siglip": to_dict(s), "data": fingerprint(CIFAR, CSV)}
    with stage_run("train_siglip", {**flatten({"siglip": to_dict(s)}), "seed": p.seed}, enabled=rank == 0) as run:
        res = fit(task, s.train, seed=p.seed, ckpt_dir=CKPT, report_dir=REPORTS, identity=identity, run=run)
        if rank == 0:
            with atomic_path(OUT) as tmp:
                model.save(tmp)
            run.log_artifact(OUT / "config.json")
            m = res.metrics
            log.info("siglip done in %.0fs (%d ranks): zero-shot %.3f (chance %.3f), i2t R@1 %.3f, t2i R@1 %.3f "
                     "(chance %.3f); %.0f samples/s", time.perf_counter() - t0, world, m.get("zero_shot_acc", 0),
                     m.get("zero_shot_chance", 0), m.get("i2t_r1", 0), m.get("t2i_r1", 0), m.get("r1_chance", 0),
                     res.samples_per_s)
    shutdown_distributed()


if __name__ == "__main__":
    raise SystemExit(main())
