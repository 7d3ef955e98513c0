"""evaluate_qa: the QA model on every held-out question, turn by turn, beside the blind baseline
(params ``evaluate.max_images``, ``evaluate.device``) -> reports/eval/vqa.json (metrics and answers).
"""
from pathlib import Path

from vlmpipe.core.errors import stage_entry
from vlmpipe.core.stage import stage
from vlmpipe.evaluate.params import EvaluateParams
from vlmpipe.qa.evaluate import evaluate

MODEL, EMBEDDINGS = Path("models/phi2_vlm"), Path("data/embeddings")
CSV, CIFAR, OUT = Path("data/cifar_qa.csv"), Path("data/cifar"), Path("reports/eval/vqa.json")


@stage_entry
def main() -> None:
    with stage("evaluate_qa", {"evaluate": EvaluateParams}, device="evaluate.device",
               needs=(MODEL, EMBEDDINGS, CSV, CIFAR), model="vqa") as s:
        metrics, examples = evaluate(s.p.evaluate, qa_dir=MODEL, embeddings_root=EMBEDDINGS, csv_path=CSV,
                                     cifar_root=CIFAR, device=s.device)
        s.write_evaluation(OUT, metrics, examples)
        s.score_version("qa", MODEL, metrics)


if __name__ == "__main__":
    raise SystemExit(main())
