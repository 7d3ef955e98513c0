"""Held-out scoring of every model: per epoch inside training, and in the evaluate stage.

- SigLIP: zero-shot classification and image<->text recall@1/5, beside their chance levels.
- QA model: loss and teacher-forced answer accuracy on held-out conversations, and greedy
  exact match turn by turn (the true earlier turns as history), beside the blind baseline.
- Captioner: validation loss per target token, and pycocoevalcap scores beside the
  most-common-caption baseline.
- Chat model: loss per assistant token on held-out conversations, and greedy exact match turn by
  turn, with the true earlier turns as history and without them.

The training stages and evaluate score through the same functions, so a per-epoch figure and the
final one are computed the same way. The functions take models and data, and import no model
code: a training stage that scores itself does not depend on the other models' files.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
import torch

from vlmpipe.data.collate import IGNORE_INDEX
from vlmpipe.data.conversations import QADataset, frame_conversations
from vlmpipe.evaluation import BlindBaseline, normalize_answer

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- SigLIP

def _recall_chance(q: np.ndarray, n: int, k: int) -> float:
    """Mean over queries of P(a random ranking of n items puts one of the query's q matches in the top k)."""
    return float(np.mean([1.0 - math.comb(n - int(qi), k) / math.comb(n, k) for qi in q]))


def retrieval_metrics(model, images: np.ndarray, labels: np.ndarray, prompts: list[str],
                      captions: list[str]) -> dict[str, float]:
    """Zero-shot classification over ``prompts`` (one per class) and image<->text recall@1/5.

    Retrieval runs over N held-out (image, caption) pairs; ``captions[i]`` is
    None for images left out of it (pass only complete captions: a caption
    that omits the colour is also true of a red circle, and would count as a
    wrong answer). Captions repeat (many images are "a photo of a red circle
    on a dark background") and identical texts cannot be told apart, so a
    retrieved item counts as correct when its caption is the query's. The
    chance level is then the same for both directions: the mean over pairs of
    1 - C(N - q, k) / C(N, k), q the number of pairs sharing the query's caption.
    """
    img = model.encode_images(images)
    zs = (img @ model.encode_texts(prompts).t()).argmax(1).numpy()
    out = {"zero_shot_acc": float((zs == labels).mean()), "zero_shot_chance": 1.0 / len(prompts)}
    keep = [i for i, c in enumerate(captions) if c]
    if len(keep) < 2:
        return out
    img, captions = img[keep], [captions[i] for i in keep]
    uniq = sorted(set(captions))
    cap_id = torch.tensor([uniq.index(c) for c in captions])
    txt = model.encode_texts(uniq)[cap_id]  # [N, D], one row per pair
    sims = img @ txt.t()                    # [N images, N texts]
    same = cap_id[:, None] == cap_id[None, :]
    n = len(captions)
    q = same.sum(1).numpy()
    for k in (1, 5):
        k_ = min(k, n)
        i2t = sims.topk(k_, dim=1).indices            # texts for each image
        t2i = sims.t().topk(k_, dim=1).indices        # images for each text
        out[f"i2t_r{k}"] = float(same.gather(1, i2t).any(1).float().mean())
        out[f"t2i_r{k}"] = float(same.gather(1, t2i).any(1).float().mean())
        out[f"r{k}_chance"] = _recall_chance(q, n, k_)
    return out


# ---------------------------------------------------------------- QA model

@torch.no_grad()
def teacher_forced(model, batch) -> dict[str, float]:
    """Summed loss, labelled-token count, and answers whose every token (EOS too) is the argmax.

    The last is teacher-forced exact match: it equals greedy-decoding exact match before
    normalisation (greedy output is the answer iff each answer token is the argmax given the
    ones before it).
    """
    logits, labels = model.text_logits(batch)
    logits = logits.float()
    valid = labels != IGNORE_INDEX
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    right = (logits.argmax(-1) == labels) | ~valid
    # An answer is a maximal run of labelled positions; a run ends at each EOS.
    eos = (labels == model.tokenizer.eos_token_id) & valid
    # Position p belongs to answer j = the number of answer EOS tokens strictly before it.
    ans_id = torch.cumsum(eos.long(), dim=1) - eos.long()
    b, t = labels.shape
    wrong = torch.zeros(b, t + 1, dtype=torch.long, device=labels.device)
    wrong.scatter_add_(1, ans_id, (~right).long())
    n_ans = eos.sum(1, keepdim=True)  # a truncated last answer without its EOS is not counted
    answers_right = int(((wrong[:, :t] == 0) & (torch.arange(t, device=labels.device) < n_ans)).sum())
    return {"nll_sum": float((nll * valid).sum()), "label_tokens": int(valid.sum()),
            "answers": int(n_ans.sum()), "answers_right": answers_right}


def predict_turns(model, data: QADataset, questions: Sequence[tuple[int, int]],
                  batch_size: int = 64) -> list[str]:
    """Greedy answers to turn ``j`` of conversation ``i`` for each (i, j), the true turns before it as history."""
    preds: list[str] = []
    for s in range(0, len(questions), batch_size):
        chunk = questions[s:s + batch_size]
        feats = torch.stack([torch.as_tensor(data.feats[i]) for i, _ in chunk])
        preds += model.answer(feats, [data.conversations[i][j][0] for i, j in chunk],
                              [data.conversations[i][:j] for i, j in chunk])
    return preds


def eval_questions(data, max_questions: int, seed: int = 0) -> list[tuple[int, int]]:
    """A fixed subset of held-out (conversation, turn) pairs of ``data.conversations`` (a ``QADataset`` or
    ``ChatDataset``): whole conversations, randomly chosen."""
    order = torch.randperm(len(data.conversations), generator=torch.Generator().manual_seed(seed)).tolist()
    out: list[tuple[int, int]] = []
    for i in order:
        if len(out) >= max_questions:
            break
        out += [(i, j) for j in range(len(data.conversations[i]))]
    return out[:max_questions]


@torch.no_grad()
def qa_scores(model, data: QADataset, batch_size: int = 64,
              questions: Sequence[tuple[int, int]] = ()) -> dict[str, float]:
    """``val_loss`` (mean NLL per answer/EOS token over ``data``), ``val_answer_acc`` (teacher-forced:
    every token of the answer and its EOS is the argmax) and, for ``questions`` ((conversation,
    turn) pairs), ``exact_match`` of the greedy answers, normalised (lower-case, no punctuation
    or articles)."""
    tot = {"nll_sum": 0.0, "label_tokens": 0, "answers": 0, "answers_right": 0}
    for s in range(0, len(data), batch_size):
        st = teacher_forced(model, model.collate([data[i] for i in range(s, min(s + batch_size, len(data)))]))
        for k in tot:
            tot[k] += st[k]
    out = {"val_loss": tot["nll_sum"] / max(tot["label_tokens"], 1),
           "val_answer_acc": tot["answers_right"] / max(tot["answers"], 1)}
    if questions:
        preds = predict_turns(model, data, questions, batch_size)
        truth = [data.conversations[i][j][1] for i, j in questions]
        out["exact_match"] = sum(normalize_answer(p) == normalize_answer(t) for p, t in zip(preds, truth)) / len(truth)
    return out


def blind_baseline(df) -> BlindBaseline:
    """The most frequent training answer per question (and type): what a model that ignores the image gets."""
    _, convs, types = frame_conversations(df, "train")
    return BlindBaseline((q, a, t) for c, ts in zip(convs, types) for (q, a), t in zip(c, ts))


# ---------------------------------------------------------------- chat model

def chat_answers(model, data, turns: Sequence[tuple[int, int]], history: bool = True,
                 batch_size: int = 64) -> list[str]:
    """Greedy replies to turn ``j`` of conversation ``i`` of a ``ChatDataset`` for each (i, j): after the
    true earlier turns (``history``), or with them removed (what the reply owes to the conversation)."""
    out: list[str] = []
    for s in range(0, len(turns), batch_size):
        chunk = turns[s:s + batch_size]
        feats = torch.stack([torch.as_tensor(data.feats[data.image_rows[i]]) for i, _ in chunk])
        out += model.answer(feats, [data.conversations[i][j][0] for i, j in chunk],
                            [data.conversations[i][:j] if history else [] for i, j in chunk])
    return out


@torch.no_grad()
def chat_scores(model, data, turns: Sequence[tuple[int, int]] = (), batch_size: int = 64) -> dict[str, float]:
    """``val_loss`` (mean NLL per assistant/EOS token over every window of ``data``) and, for ``turns``,
    ``exact_match`` of the greedy replies (normalised) with the true history."""
    tot = {"nll_sum": 0.0, "label_tokens": 0}
    for s in range(0, len(data), batch_size):
        st = teacher_forced(model, model.collate([data[i] for i in range(s, min(s + batch_size, len(data)))]))
        tot["nll_sum"] += st["nll_sum"]
        tot["label_tokens"] += st["label_tokens"]
    out = {"val_loss": tot["nll_sum"] / max(tot["label_tokens"], 1)}
    if turns:
        preds = chat_answers(model, data, turns, batch_size=batch_size)
        truth = [data.conversations[i][j][1] for i, j in turns]
        out["exact_match"] = sum(normalize_answer(p) == normalize_answer(t) for p, t in zip(preds, truth)) / len(truth)
    return out


# ---------------------------------------------------------------- captioner

def validation_loss(model, data, batch_size: int = 128) -> float:
    """Mean loss per target token (caption tokens + EOS) over every sample of ``data``, in order."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                out = model(model.collate([data[i] for i in range(start, min(len(data), start + batch_size))]),
                            reduction="sum")
                total += float(out["loss"])
                count += int(out["targets"])
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("validation set has no target tokens")
    return total / count


def caption_evaluator(val, feats: torch.Tensor, refs: Sequence[Sequence[str]], show: int = 3,
                      batch_size: int = 128):
    """``evaluate(model, epoch)`` for ``vlmpipe.train.fit``: val loss (+ a few captions logged)."""

    def evaluate(model, epoch: int) -> dict[str, float]:
        metrics = {"val_loss": validation_loss(model, val, batch_size)}
        if show:
            for cap, ref in zip(model.caption(feats[:show]), refs[:show]):
                log.info("epoch %d sample: %r | reference: %r", epoch, cap, ref[0])
        return metrics

    return evaluate


