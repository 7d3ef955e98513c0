"""train_gpt2_chat: the captioner continued into a chat model on multi-turn conversations.

Reads models/captioner (the starting point), data/conversations ({train,val}.json, LLaVA format),
data/embeddings/coco_* (the image prefix), params ``chat`` and ``seed``. Writes models/chat/
(``vlmpipe.models.chat_model.load_chat_model``), models/checkpoints/chat/ (resumed automatically) and
reports/chat/ (curves; held-out loss and exact match per epoch).
"""
from pathlib import Path

from vlmpipe.chat import stage as chat
from vlmpipe.chat.params import ChatParams
from vlmpipe.core.errors import stage_entry
from vlmpipe.core.stage import stage

CAPTIONER, CONVERSATIONS, EMBEDDINGS = Path("models/captioner"), Path("data/conversations"), Path("data/embeddings")
OUT, CKPT, REPORTS = Path("models/chat"), Path("models/checkpoints/chat"), Path("reports/chat")


@stage_entry
def main() -> None:
    with stage("train_gpt2_chat", {"chat": ChatParams}, device="chat.train.device", model="chat") as s:
        chat.run_stage(s.p.chat, seed=s.p.seed, captioner_dir=CAPTIONER, conversations_root=CONVERSATIONS,
                       embeddings_root=EMBEDDINGS, out_dir=OUT, ckpt_dir=CKPT, report_dir=REPORTS, run=s.run)
        s.register("chat", OUT)


if __name__ == "__main__":
    raise SystemExit(main())
