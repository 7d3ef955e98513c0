"""report: the four evaluations (reports/eval/*.json) gathered into reports/metrics.json (each metric next
to its baseline or chance level), reports/plots/*.png and the gallery, reports/gallery.{png,html}, of
``evaluate.gallery_images`` held-out examples per model (images from data/coco, data/cifar); to MLflow too.
"""
from pathlib import Path

from vlmpipe.core.errors import stage_entry
from vlmpipe.core.stage import stage
from vlmpipe.evaluate.params import EvaluateParams
from vlmpipe.evaluate.stage import report_all


@stage_entry
def main() -> None:
    with stage("report", {"evaluate": EvaluateParams}) as s:
        report_all(s.p.evaluate, run=s.run, eval_dir=Path("reports/eval"), reports=Path("reports"),
                   coco_root=Path("data/coco"), cifar_root=Path("data/cifar"))


if __name__ == "__main__":
    raise SystemExit(main())
