"""The body of train_siglip: SigLIP on the CIFAR train split and the Q/A CSV's texts."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vlmpipe.data.cifar import load_split
from vlmpipe.data.image_texts import ImageTextPairs, image_texts, retrieval_captions
from vlmpipe.data.qa import part, read_qa_csv
from vlmpipe.siglip.heldout import retrieval_metrics
from vlmpipe.core.io import atomic_path
from vlmpipe.models.siglip.model import build_siglip
from vlmpipe.core.params import to_dict
from vlmpipe.core.runtime import is_main_process
from vlmpipe.loop.train import FitResult, TrainTask, decay_groups, fingerprint, fit, mfu_text

log = logging.getLogger(__name__)


def param_groups(model, lr: float, weight_decay: float, logit_lr_mult: float) -> list[dict]:
    """The loop's decay groups, and the temperature and bias at ``lr * logit_lr_mult`` (they have to
    travel from log 10 / -10 to their working values fast)."""
    logit = [model.loss_fn.log_temperature, model.loss_fn.bias]
    rest = [q for q in model.parameters() if q.requires_grad and all(q is not x for x in logit)]
    return decay_groups(rest, lr, weight_decay) + [{"params": logit, "lr": lr * logit_lr_mult, "weight_decay": 0.0}]


def run_stage(s, *, seed: int, cifar_root: Path, csv_path: Path, out_dir: Path, ckpt_dir: Path,
              report_dir: Path, run: Any = None) -> FitResult:
    """SigLIP (``SiglipParams`` ``s``) on the CIFAR train split and the texts of the CSV's training rows
    (none about an image held out for the QA model); held-out zero-shot accuracy and retrieval on the
    test split after every epoch."""
    train, test = load_split(cifar_root, "train"), load_split(cifar_root, "test")
    df = read_qa_csv(csv_path, cifar_root)
    tr = image_texts(part(df, "train"), "train", len(train), train.label_names)  # no held-out image's answers
    te = image_texts(df, "test", len(test), test.label_names)
    test_captions = retrieval_captions(te, test.labels)
    texts = tr.prompts + [c for c in tr.captions if c] + [t for ts in tr.qa_texts for t in ts]
    model = build_siglip(s, texts)
    model.config["class_prompts"] = tr.prompts
    data = ImageTextPairs(train.images, train.labels, tr.prompts, tr.captions, tr.qa_texts, model.tokenizer,
                          s.text_max_tokens, seed)
    log.info("siglip: %d train images, %d distinct texts; %d test images (%d with complete captions); "
             "%.2fM trainable params", len(data), len(data.vocab), len(test), sum(map(bool, test_captions)),
             sum(q.numel() for q in model.parameters() if q.requires_grad) / 1e6)
    task = TrainTask(
        name="siglip", model=model, train_data=data, collate=data.collate,
        param_groups=lambda m, lr: param_groups(m, lr, s.train.weight_decay, s.logit_lr_mult),
        evaluate=lambda m, epoch: retrieval_metrics(m, test.images, test.labels, tr.prompts, test_captions))
    res = fit(task, s.train, seed=seed, ckpt_dir=ckpt_dir, report_dir=report_dir,
              identity={"siglip": to_dict(s), "data": fingerprint(cifar_root, csv_path)}, run=run)
    if is_main_process():
        with atomic_path(out_dir) as tmp:
            model.save(tmp)
        m = res.metrics
        log.info("siglip: zero-shot %.3f (chance %.3f), i2t R@1 %.3f, t2i R@1 %.3f (chance %.3f); %.0f samples/s, "
                 "MFU %s", m.get("zero_shot_acc", 0), m.get("zero_shot_chance", 0), m.get("i2t_r1", 0),
                 m.get("t2i_r1", 0), m.get("r1_chance", 0), res.samples_per_s, mfu_text(res.speed))
    return res
