"""train_siglip: the SigLIP image and text towers, trained contrastively with the sigmoid loss.

Reads data/cifar (train split; test split held out) and data/cifar_qa.csv (texts), params ``siglip``
and ``seed``. Writes models/siglip/ (``vlmpipe.models.siglip.model.load_siglip``), models/checkpoints/siglip/
(resumed automatically) and reports/siglip/ (curves; zero-shot and recall@1/5 beside chance).
"""
from pathlib import Path

from vlmpipe.core.errors import stage_entry
from vlmpipe.core.stage import stage
from vlmpipe.siglip import stage as siglip
from vlmpipe.siglip.params import SiglipParams

CIFAR, CSV = Path("data/cifar"), Path("data/cifar_qa.csv")
OUT, CKPT, REPORTS = Path("models/siglip"), Path("models/checkpoints/siglip"), Path("reports/siglip")


@stage_entry
def main() -> None:
    with stage("train_siglip", {"siglip": SiglipParams}, device="siglip.train.device", model="siglip") as s:
        siglip.run_stage(s.p.siglip, seed=s.p.seed, cifar_root=CIFAR, csv_path=CSV, out_dir=OUT, ckpt_dir=CKPT,
                         report_dir=REPORTS, run=s.run)
        s.register("siglip", OUT)


if __name__ == "__main__":
    raise SystemExit(main())
