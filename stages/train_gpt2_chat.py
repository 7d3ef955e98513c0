"""train_gpt2_chat: the captioner continued into a chat model on multi-turn conversations.

Reads:  models/captioner (projector + GPT-2 + tokenizer: the starting point, loaded in one
        call), data/conversations ({train,val}.json in the LLaVA format), data/embeddings (the
        cached COCO features the captioner was trained on: the image prefix), params ``seed``
        and ``chat``.
Writes: models/chat/ (load with ``vlmpipe.models.chat_model.load_chat_model``),
        models/checkpoints/chat/ (resumed automatically), reports/chat/{train_curve,val_curve}.csv
        and metrics.json (held-out loss per assistant token and exact match per epoch),
        reports/speed/chat.json.

Runs as ``python stages/train_gpt2_chat.py`` or under torchrun (DDP; rank 0 writes).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from vlmpipe.errors import stage_entry
from vlmpipe.params import flatten, load_params, to_dict
from vlmpipe import registry
from vlmpipe.pipeline import train_chat
from vlmpipe.runtime import seed_everything
from vlmpipe.sources import preflight
from vlmpipe.tracking import stage_run
from vlmpipe.train import mfu_text, setup_distributed, shutdown_distributed

CAPTIONER, CONVERSATIONS, EMBEDDINGS = Path("models/captioner"), Path("data/conversations"), Path("data/embeddings")
OUT, CKPT, REPORTS = Path("models/chat"), Path("models/checkpoints/chat"), Path("reports/chat")
log = logging.getLogger("train_gpt2_chat")


@stage_entry
def main() -> None:
    t0 = time.perf_counter()
    p = load_params()
    preflight("train_gpt2_chat", p)
    rank, world, _ = setup_distributed(p.chat.train.device, "chat.train.device")
    seed_everything(p.seed)
    params = {**flatten({"chat": to_dict(p.chat)}), "seed": p.seed}
    with stage_run("train_gpt2_chat", params, enabled=rank == 0) as run:
        res = train_chat.run_stage(p.chat, seed=p.seed, captioner_dir=CAPTIONER, conversations_root=CONVERSATIONS,
                                   embeddings_root=EMBEDDINGS, out_dir=OUT, ckpt_dir=CKPT, report_dir=REPORTS,
                                   run=run)
        if rank == 0:
            run.log_artifact(OUT / "model.json")
            registry.log_model(run, "chat", OUT)
            log.info("chat done in %.0fs (%d ranks): val_loss %.4f, exact match %.3f, %.0f tokens/s, MFU %s",
                     time.perf_counter() - t0, world, res.metrics.get("val_loss", float("nan")),
                     res.metrics.get("exact_match", float("nan")), res.tokens_per_s, mfu_text(res.speed))
    shutdown_distributed()


if __name__ == "__main__":
    raise SystemExit(main())
