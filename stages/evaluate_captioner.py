"""evaluate_captioner: the captioner on the held-out COCO split, pycocoevalcap scores beside the
constant caption, and on the shapes world the share of scenes captioned entirely right (checked against
data/coco/annotations/scenes_val2017.json) (params ``evaluate.max_images``, ``evaluate.device``)
-> reports/eval/captioner.json.
"""
from pathlib import Path

from vlmpipe.captioner.evaluate import evaluate
from vlmpipe.core.errors import stage_entry
from vlmpipe.core.stage import stage
from vlmpipe.evaluate.params import EvaluateParams

MODEL, EMBEDDINGS, COCO = Path("models/captioner"), Path("data/embeddings"), Path("data/coco")
OUT = Path("reports/eval/captioner.json")


@stage_entry
def main() -> None:
    with stage("evaluate_captioner", {"evaluate": EvaluateParams}, device="evaluate.device",
               needs=(MODEL, EMBEDDINGS, COCO), model="captioner") as s:
        metrics, examples = evaluate(s.p.evaluate, captioner_dir=MODEL, embeddings_root=EMBEDDINGS, coco_root=COCO,
                                     device=s.device)
        s.write_evaluation(OUT, metrics, examples)
        s.score_version("captioner", MODEL, metrics)


if __name__ == "__main__":
    raise SystemExit(main())
