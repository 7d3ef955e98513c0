"""The body of the report stage: the four models' held-out evaluations (``reports/eval/*.json``, one
stage each) gathered into ``reports/metrics.json``, the plots and the sample gallery."""
from __future__ import annotations

import logging
from pathlib import Path

from vlmpipe.core.errors import UserError
from vlmpipe.core.io import read_json, write_json
from vlmpipe.core.params import flatten
from vlmpipe.evaluate import report

log = logging.getLogger(__name__)

# The sections of reports/metrics.json, in order: one evaluation file each.
SECTIONS = ("siglip", "vqa", "captioner", "chat")


def report_all(e, *, run, eval_dir: Path, reports: Path, coco_root: Path, cifar_root: Path) -> dict:
    """Write ``reports/metrics.json`` (each metric beside its baseline), the plots and the gallery of
    ``EvaluateParams`` ``e``, and log them to ``run``; returns the metrics."""
    evaluations = {}
    for name in SECTIONS:
        f = Path(eval_dir) / f"{name}.json"
        if not f.is_file():
            raise UserError(f"{f}: missing upstream output (run `dvc repro` to build it)")
        evaluations[name] = read_json(f)
    metrics = {name: ev["metrics"] for name, ev in evaluations.items()}
    write_json(reports / "metrics.json", metrics)
    pictures = report.evaluation_reports(reports, metrics, evaluations["vqa"]["examples"],
                                         evaluations["captioner"]["examples"], e.gallery_images, coco_root,
                                         cifar_root, evaluations["chat"]["examples"])
    # Under the names the evaluation stages log them by (``vqa/accuracy``): one name per quantity.
    run.log_metrics({f"{name}/{k}": v for name, m in metrics.items() for k, v in flatten(m).items()
                     if isinstance(v, (int, float))})
    for f in [reports / "metrics.json", *pictures]:
        run.log_artifact(f, "reports")
    s, v, c, ch = metrics["siglip"], metrics["vqa"], metrics["captioner"], metrics["chat"]
    log.info("zero-shot %.3f (chance %.3f) | VQA %.3f (blind %.3f) | CIDEr %.3f (constant caption %.3f) | chat %.3f "
             "(blind %.3f; follow-ups %.3f, without history %.3f)", s["zero_shot_acc"], s["zero_shot_chance"],
             v["accuracy"], v["blind_baseline"], c["cider"], c["baseline_cider"], ch["exact_match"],
             ch["blind_baseline"], ch["by_type"].get("followup", float("nan")),
             ch.get("followup_no_history", float("nan")))
    return metrics

