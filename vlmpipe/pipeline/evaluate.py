"""The body of evaluate: every trained model on held-out data, beside its baseline."""
from __future__ import annotations

import logging

import torch
from tqdm import tqdm

from vlmpipe import embeddings
from vlmpipe.data import llava
from vlmpipe.data.captions import caption_split
from vlmpipe.data.chat import ChatDataset, load_conversations
from vlmpipe.data.cifar import load_split
from vlmpipe.data.coco import CocoCaptions
from vlmpipe.data.conversations import QADataset, frame_conversations
from vlmpipe.data.image_texts import image_texts, retrieval_captions
from vlmpipe.data.qa import read_qa_csv
from vlmpipe.evaluation import BlindBaseline, caption_scores, most_common_caption, vqa_accuracy
from vlmpipe.heldout import blind_baseline, chat_answers, chat_scores, predict_turns, retrieval_metrics
from vlmpipe.models.captioner import load_captioner
from vlmpipe.models.chat_model import load_chat_model
from vlmpipe.models.qa_model import load_qa_model
from vlmpipe.models.siglip import load_siglip

log = logging.getLogger(__name__)


def _first(n: int, limit: int) -> int:
    return n if limit <= 0 else min(n, limit)


def evaluate_siglip(siglip_dir, cifar_root, df, limit: int = 0, device="cpu") -> dict:
    """Zero-shot accuracy and recall@1/5 both ways on held-out CIFAR, with chance levels."""
    model = load_siglip(siglip_dir, device)
    test = load_split(cifar_root, "test")
    n = _first(len(test), limit)
    texts = image_texts(df, "test", len(test), test.label_names)
    # The same held-out captions train_siglip reports per epoch (and the same fallback for a CSV
    # without colour or brightness questions).
    captions = retrieval_captions(texts, test.labels, n)
    with torch.no_grad():
        return retrieval_metrics(model, test.images[:n], test.labels[:n], texts.prompts, captions)


def evaluate_vqa(model_dir, embeddings_root, df, limit: int = 0, batch_size: int = 64,
                 csv_path: str = "data/cifar_qa.csv", device="cpu"):
    """Exact match on held-out questions, asked turn by turn with the true earlier turns as history.

    Returns (metrics, examples) where examples[i] = (dataset index, label, [(q, predicted, truth, type)]).
    """
    model = load_qa_model(model_dir, device=device)
    test = df[df["Split"] == "test"].sort_values("Dataset_Index")
    n = _first(len(test), limit)
    idx, convs, types = (x[:n] for x in frame_conversations(test, "test"))
    labels = [str(v) for v in test["Class_Label"].tolist()[:n]]
    feats = embeddings.features_for(embeddings_root, "cifar", "test", idx, model.config.encoder, csv_path).float()
    data = QADataset(model.tokenizer, feats, convs)
    questions = [(i, j) for i, c in enumerate(convs) for j in range(len(c))]
    preds: list[list[str]] = [[] for _ in convs]
    for s in tqdm(range(0, len(questions), batch_size), desc="vqa answers", leave=False):
        chunk = questions[s:s + batch_size]
        for (i, _), p in zip(chunk, predict_turns(model, data, chunk, batch_size)):
            preds[i].append(p)  # questions run turn by turn within a conversation, so order holds
    truth = [[(q, a, t) for (q, a), t in zip(c, ts)] for c, ts in zip(convs, types)]
    metrics = vqa_accuracy([(p, a, t) for tr, ps in zip(truth, preds) for (_, a, t), p in zip(tr, ps)])
    blind = blind_baseline(df)
    blind_acc = vqa_accuracy([(blind(q, t), a, t) for tr in truth for q, a, t in tr])
    metrics["blind_baseline"] = blind_acc["accuracy"]
    metrics["blind_by_type"] = blind_acc["by_type"]
    examples = [(i, lab, [(q, p, a, t) for (q, a, t), p in zip(tr, ps)])
                for i, lab, tr, ps in zip(idx, labels, truth, preds)]
    return metrics, examples


def evaluate_captioner(model_dir, embeddings_root, coco_root, limit: int = 0, meteor: bool = True, device="cpu"):
    """pycocoevalcap scores on the held-out (val) split + the constant-caption baseline.

    Returns (metrics, examples) where examples = [(image id, generated, references)].
    """
    model = load_captioner(model_dir, device=device)
    enc = model.config.encoder
    ids, feats, refs_all, _ = caption_split(coco_root, embeddings_root, "val", enc if enc.get("hash") else None,
                                            model.config.regions)
    n = _first(len(ids), limit)
    ids = ids[:n]
    with torch.no_grad():
        generated = model.caption(feats[:n].float())
    refs = dict(zip(ids, refs_all[:n]))
    cands = dict(zip(ids, generated))
    metrics = caption_scores(refs, cands, meteor=meteor)
    train = CocoCaptions(coco_root, "train")
    constant = most_common_caption(c for i in train.ids for c in train.captions(i))
    base = caption_scores(refs, {i: constant for i in ids}, meteor=False)
    metrics.update(baseline_cider=base["cider"], baseline_bleu4=base["bleu4"], baseline_caption=constant,
                   n_images=len(ids))
    return metrics, [(i, cands[i], refs[i]) for i in ids]


def evaluate_chat(model_dir, conversations_root, embeddings_root, limit: int = 0, device="cpu"):
    """Exact match on held-out conversations, turn by turn with the true earlier turns as history, by turn
    type; follow-ups again with the history removed; the blind baseline (the most frequent training
    answer to the same question, never seeing the image); NLL per assistant token.

    Returns (metrics, examples) where examples[i] = (image id, [(message, reply, truth, type)]).
    """
    model = load_chat_model(model_dir, device=device)
    feats, rows, convs, types, records = load_conversations(conversations_root, "val", embeddings_root,
                                                            model.config.encoder)
    n = _first(len(convs), limit)
    data = ChatDataset(model.tokenizer, feats, rows[:n], convs[:n], model.window)
    turns = [(i, j) for i in range(n) for j in range(len(convs[i]))]
    replies = chat_answers(model, data, turns)
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
        alone = chat_answers(model, data, [turns[k] for k in follow], history=False)
        out["followup_no_history"] = vqa_accuracy([(p, truth[k][1], "followup") for p, k in zip(alone, follow)])["accuracy"]
    examples = [(llava.image_id(r["image"]), []) for r in records[:n]]
    for (i, _), reply, (q, a, t) in zip(turns, replies, truth):
        examples[i][1].append((q, reply, a, t))
    return out, examples


def run_stage(e, *, csv_path, cifar_root, coco_root, embeddings_root, siglip_dir, qa_dir, captioner_dir,
              chat_dir, conversations_root, device) -> tuple[dict, list, list, list]:
    """Every model on held-out data (``EvaluateParams`` ``e``): the ``reports/metrics.json`` sections
    (each metric beside its baseline), and the QA, caption and chat examples for the gallery."""
    df = read_qa_csv(csv_path, cifar_root)
    log.info("scoring SigLIP on %s", device)
    sig = evaluate_siglip(siglip_dir, cifar_root, df, e.max_images, device=device)
    log.info("scoring the QA model")
    vqa, qa_examples = evaluate_vqa(qa_dir, embeddings_root, df, e.max_images, csv_path=str(csv_path), device=device)
    log.info("scoring the captioner")
    cap, cap_examples = evaluate_captioner(captioner_dir, embeddings_root, coco_root, e.max_images, device=device)
    if cap["meteor"] is None:
        log.warning("captioner.meteor is null: %s", cap.get("meteor_skipped"))
    log.info("scoring the chat model")
    chat, chat_examples = evaluate_chat(chat_dir, conversations_root, embeddings_root, e.max_images, device=device)

    def r4(d: dict) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}
    metrics = {
        "siglip": r4(sig),
        "vqa": {"accuracy": round(vqa["accuracy"], 4), "blind_baseline": round(vqa["blind_baseline"], 4),
                "n_questions": vqa["n_questions"], "by_type": r4(vqa["by_type"]),
                "blind_by_type": r4(vqa["blind_by_type"])},
        "captioner": r4({k: v for k, v in cap.items() if k != "baseline_caption"}),
        "chat": {k: r4(v) if isinstance(v, dict) else round(v, 4) if isinstance(v, float) else v
                 for k, v in chat.items()},
    }
    return metrics, qa_examples, cap_examples, chat_examples
