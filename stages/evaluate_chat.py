"""evaluate_chat: the chat model on held-out conversations by turn type, with and without the history,
beside the blind baseline (params ``evaluate.max_images``, ``evaluate.device``) -> reports/eval/chat.json.
"""
from pathlib import Path

from vlmpipe.chat.evaluate import evaluate
from vlmpipe.core.errors import stage_entry
from vlmpipe.core.stage import stage
from vlmpipe.evaluate.params import EvaluateParams

MODEL, CONVERSATIONS, EMBEDDINGS = Path("models/chat"), Path("data/conversations"), Path("data/embeddings")
OUT = Path("reports/eval/chat.json")


@stage_entry
def main() -> None:
    with stage("evaluate_chat", {"evaluate": EvaluateParams}, device="evaluate.device",
               needs=(MODEL, CONVERSATIONS, EMBEDDINGS), model="chat") as s:
        metrics, examples = evaluate(s.p.evaluate, chat_dir=MODEL, conversations_root=CONVERSATIONS,
                                     embeddings_root=EMBEDDINGS, device=s.device)
        s.write_evaluation(OUT, metrics, examples)
        s.score_version("chat", MODEL, metrics)


if __name__ == "__main__":
    raise SystemExit(main())
