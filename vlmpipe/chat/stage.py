"""The body of train_gpt2_chat: the trained captioner continued on the conversations."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vlmpipe.data import features as embeddings
from vlmpipe.data.chat import ChatDataset, coco_caches, load_conversations
from vlmpipe.chat.heldout import chat_scores
from vlmpipe.scoring.heldout import eval_questions
from vlmpipe.models.captioner import load_captioner
from vlmpipe.models.chat_model import ChatModel
from vlmpipe.core.params import to_dict
from vlmpipe.core.runtime import is_main_process
from vlmpipe.loop.train import FitResult, TrainTask, fingerprint, fit, mfu_text

log = logging.getLogger(__name__)


def chat_evaluator(val: ChatDataset, turns: list[tuple[int, int]], show: int = 2):
    """``evaluate(model, epoch)`` for ``vlmpipe.loop.train.fit``: held-out loss and exact match (+ a few
    replies logged)."""

    def evaluate(model, epoch: int) -> dict[str, float]:
        replies: list[str] = []
        metrics = chat_scores(model, val, turns, replies=replies)
        for (i, j), reply in zip(turns[:show], replies):
            log.info("epoch %d: %r -> %r (truth %r)", epoch, val.conversations[i][j][0], reply,
                     val.conversations[i][j][1])
        return metrics

    return evaluate


def run_stage(cp, *, seed: int, captioner_dir: Path, conversations_root: Path, embeddings_root: Path,
              out_dir: Path, ckpt_dir: Path, report_dir: Path, run: Any = None) -> FitResult:
    """The chat model (``ChatParams`` ``cp``): the captioner in ``captioner_dir``, continued on the conversations."""
    captioner = load_captioner(captioner_dir, device="cpu")  # fit() moves the model to its device
    model = ChatModel.from_captioner(captioner, max_seq_len=cp.max_seq_len, max_new_tokens=cp.max_new_tokens)
    enc = model.config.encoder
    caches = coco_caches(embeddings_root, enc)  # read once, for both splits
    tf, trows, tturns, _, _ = load_conversations(conversations_root, "train", caches)
    vf, vrows, vturns, _, _ = load_conversations(conversations_root, "val", caches)
    train = ChatDataset(model.tokenizer, tf, trows, tturns, model.window)
    val = ChatDataset(model.tokenizer, vf, vrows, vturns, model.window)
    log.info("chat: %d train conversations -> %d windows (%d tokens), %d held out; window %d text tokens; "
             "%.2fM trainable params, starting from %s", len(tturns), len(train), train.num_tokens(), len(vturns),
             model.window, sum(q.numel() for q in model.parameters() if q.requires_grad) / 1e6, captioner_dir)
    task = TrainTask("chat", model, train, model.pack,
                     evaluate=chat_evaluator(val, eval_questions(val, cp.eval_turns, seed)))
    data_id = fingerprint(conversations_root, captioner_dir,
                          *[p for p in (embeddings.path_for(embeddings_root, "coco", s) for s in ("train", "val"))
                            if p.exists()])
    res = fit(task, cp.train, seed=seed, ckpt_dir=ckpt_dir, report_dir=report_dir,
              identity={"chat": to_dict(cp), "data": data_id}, run=run)
    if is_main_process():
        model.save(out_dir)
        m = res.metrics
        log.info("chat: val_loss %.4f, exact match %.3f, %.0f tokens/s, MFU %s", m.get("val_loss", float("nan")),
                 m.get("exact_match", float("nan")), res.tokens_per_s, mfu_text(res.speed))
    return res
