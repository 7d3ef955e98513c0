"""evaluate_siglip: SigLIP on the held-out CIFAR split (zero-shot accuracy, image<->text recall@1/5,
beside chance; params ``evaluate.max_images``, ``evaluate.device``) -> reports/eval/siglip.json.
"""
from pathlib import Path

from vlmpipe.core.errors import stage_entry
from vlmpipe.core.stage import stage
from vlmpipe.evaluate.params import EvaluateParams
from vlmpipe.siglip.evaluate import evaluate

MODEL, CIFAR, CSV = Path("models/siglip"), Path("data/cifar"), Path("data/cifar_qa.csv")
OUT = Path("reports/eval/siglip.json")


@stage_entry
def main() -> None:
    with stage("evaluate_siglip", {"evaluate": EvaluateParams}, device="evaluate.device",
               needs=(MODEL, CIFAR, CSV), model="siglip") as s:
        metrics, examples = evaluate(s.p.evaluate, siglip_dir=MODEL, cifar_root=CIFAR, csv_path=CSV, device=s.device)
        s.write_evaluation(OUT, metrics, examples)
        s.score_version("siglip", MODEL, metrics)


if __name__ == "__main__":
    raise SystemExit(main())
