"""The chat model in the evaluate_chat stage: exact match on held-out conversations by turn type, with and
without the history, beside the blind baseline; the replies as examples."""
from __future__ import annotations

import torch

from vlmpipe.chat.heldout import chat_scores
from vlmpipe.scoring.heldout import predict_turns
from vlmpipe.data import llava
from vlmpipe.data.chat import ChatDataset, coco_caches, load_conversations
from vlmpipe.models.chat_model import load_chat_model
from vlmpipe.scoring.metrics import BlindBaseline, first, round4, vqa_accuracy


@torch.no_grad()
def evaluate(e, *, chat_dir, conversations_root, embeddings_root, device="cpu") -> tuple[dict, list]:
    """(the ``chat`` section of reports/metrics.json, the replies per conversation) under ``EvaluateParams`` ``e``."""
    chat, examples = evaluate_chat(chat_dir, conversations_root, embeddings_root, e.max_images, device=device)
    return round4(chat), examples


def evaluate_chat(model_dir, conversations_root, embeddings_root, limit: int = 0, device="cpu"):
    """Exact match on held-out conversations, turn by turn with the true earlier turns as history, by turn
    type; follow-ups again with the history removed; the blind baseline (the most frequent training
    answer to the same question, never seeing the image); NLL per assistant token.

    Returns (metrics, examples) where examples[i] = (image id, [(message, reply, truth, type)]).
    """
    model = load_chat_model(model_dir, device=device)
    feats, rows, convs, types, records = load_conversations(conversations_root, "val",
                                                            coco_caches(embeddings_root, model.config.encoder))
    n = first(len(convs), limit)
    data = ChatDataset(model.tokenizer, feats, rows[:n], convs[:n], model.window)
    turns = [(i, j) for i in range(n) for j in range(len(convs[i]))]
    replies = predict_turns(model, data, turns)
    truth = [(convs[i][j][0], convs[i][j][1], types[i][j]) for i, j in turns]
    metrics = vqa_accuracy([(p, a, t) for p, (_, a, t) in zip(replies, truth)])
    train_records, train_types = llava.load_split(conversations_root, "train")
    blind = BlindBaseline((q, a, t) for r in train_records
                          for (q, a), t in zip(llava.turns_of(r), train_types.get(str(r["id"]))
                                               or llava.default_types(len(r["conversations"]) // 2)))
    blind_acc = vqa_accuracy([(blind(q, t), a, t) for q, a, t in truth])
    follow = [k for k, (_, _, t) in enumerate(truth) if t == "followup"]
    out = {"exact_match": metrics["accuracy"], "blind_baseline": blind_acc["accuracy"],
           "n_turns": metrics["n_questions"], "n_conversations": n,
           "by_type": metrics["by_type"], "blind_by_type": blind_acc["by_type"],
           "nll_per_token": chat_scores(model, data)["val_loss"]}
    if follow:  # the same follow-up questions asked with the conversation before them removed
        alone = predict_turns(model, data, [turns[k] for k in follow], history=False)
        out["followup_no_history"] = vqa_accuracy([(p, truth[k][1], "followup") for p, k in zip(alone, follow)])["accuracy"]
    examples = [(llava.image_id(r["image"]), []) for r in records[:n]]
    for (i, _), reply, (q, a, t) in zip(turns, replies, truth):
        examples[i][1].append((q, reply, a, t))
    return out, examples
