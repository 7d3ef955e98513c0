"""evaluate: every model on held-out data, beside its baseline; plots and a gallery.

Reads:  models/{siglip,phi2_vlm,captioner,chat}, data/embeddings, data/coco, data/cifar,
        data/cifar_qa.csv, data/conversations, reports/*/ (training curves), params ``evaluate``.
Writes: reports/metrics.json (siglip / vqa / captioner / chat sections, each metric next to its
        baseline or chance level), reports/plots/*.png, reports/gallery.{png,html};
        the same to MLflow.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from vlmpipe import report
from vlmpipe.pipeline import evaluate
from vlmpipe.errors import UserError, stage_entry
from vlmpipe.io import write_json
from vlmpipe.params import flatten, load_params, to_dict
from vlmpipe.runtime import resolve_device, seed_everything
from vlmpipe.sources import preflight
from vlmpipe.tracking import stage_run

CSV, CIFAR, COCO, EMB = Path("data/cifar_qa.csv"), Path("data/cifar"), Path("data/coco"), Path("data/embeddings")
SIGLIP, PHI, CAPTIONER = Path("models/siglip"), Path("models/phi2_vlm"), Path("models/captioner")
CHAT, CONVERSATIONS = Path("models/chat"), Path("data/conversations")
REPORTS = Path("reports")
log = logging.getLogger("evaluate")


@stage_entry
def main() -> None:
    t0 = time.perf_counter()
    p = load_params()
    preflight("evaluate", p)  # anything this or a later stage cannot fetch: one line now
    e = p.evaluate
    seed_everything(p.seed)
    device = resolve_device(e.device, "evaluate.device")
    torch.set_grad_enabled(False)
    for need in (CSV, CIFAR, COCO, EMB, SIGLIP, PHI, CAPTIONER, CHAT, CONVERSATIONS):
        if not need.exists():
            raise UserError(f"{need}: missing upstream output (run `dvc repro` to build it)")
    with stage_run("evaluate", flatten({"evaluate": to_dict(e)})) as run:
        metrics, qa_examples, cap_examples, chat_examples = evaluate.run_stage(
            e, csv_path=CSV, cifar_root=CIFAR, coco_root=COCO, embeddings_root=EMB, siglip_dir=SIGLIP, qa_dir=PHI,
            captioner_dir=CAPTIONER, chat_dir=CHAT, conversations_root=CONVERSATIONS, device=device)
        write_json(REPORTS / "metrics.json", metrics)
        pictures = report.evaluation_reports(REPORTS, metrics, qa_examples, cap_examples, e.gallery_images, COCO, CIFAR,
                                             chat_examples)
        run.log_metrics({k: v for k, v in flatten(metrics).items() if isinstance(v, (int, float))})
        for f in [REPORTS / "metrics.json", *pictures]:
            run.log_artifact(f, "reports")
    s, v, c, ch = metrics["siglip"], metrics["vqa"], metrics["captioner"], metrics["chat"]
    log.info("evaluate done in %.0fs | zero-shot %.3f (chance %.3f) | VQA %.3f (blind %.3f) | CIDEr %.3f "
             "(constant caption %.3f) | chat %.3f (blind %.3f; follow-ups %.3f, without history %.3f)",
             time.perf_counter() - t0, s["zero_shot_acc"], s["zero_shot_chance"], v["accuracy"], v["blind_baseline"],
             c["cider"], c["baseline_cider"], ch["exact_match"], ch["blind_baseline"],
             ch["by_type"].get("followup", float("nan")), ch.get("followup_no_history", float("nan")))


if __name__ == "__main__":
    raise SystemExit(main())
