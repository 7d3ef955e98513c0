"""Held-out scoring of each trained model, for the evaluate stage.

Kept apart from ``vlmpipe.evaluation`` (the metric and baseline primitives) on
purpose: train_phi2_qlora scores itself with those primitives, and DVC reruns
a stage when a module it depends on changes, so changes to this driver must
not retrain the QA model.
"""
from __future__ import annotations

import torch

from vlmpipe.evaluation import BlindBaseline, caption_scores, most_common_caption, vqa_accuracy


def _first(n: int, limit: int) -> int:
    return n if limit <= 0 else min(n, limit)


def evaluate_siglip(siglip_dir, cifar_root, df, limit: int = 0, device="cpu") -> dict:
    """Zero-shot accuracy and recall@1/5 both ways on held-out CIFAR, with chance levels."""
    from vlmpipe.data.cifar import load_split
    from vlmpipe.models.siglip import image_texts, load_siglip, retrieval_captions, retrieval_metrics

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

    Uses the QA stage's own framing, embedding lookup and batched greedy answering, so the
    stage's per-epoch exact match and this score are computed the same way.
    Returns (metrics, examples) where examples[i] = (dataset index, label, [(q, predicted, truth, type)]).
    """
    from tqdm import tqdm

    from vlmpipe.models.phi_vlm import QADataset, frame_conversations, load_split_embeddings, load_vlm, predict_turns

    model = load_vlm(model_dir, device=device)
    test = df[df["Split"] == "test"].sort_values("Dataset_Index")
    n = _first(len(test), limit)
    idx, convs, types = (x[:n] for x in frame_conversations(test, "test"))
    labels = [str(v) for v in test["Class_Label"].tolist()[:n]]
    feats = load_split_embeddings(embeddings_root, "test", idx, csv_path, model.info["encoder"]).float()
    data = QADataset(model.tokenizer, feats, convs)
    questions = [(i, j) for i, c in enumerate(convs) for j in range(len(c))]
    preds: list[list[str]] = [[] for _ in convs]
    for s in tqdm(range(0, len(questions), batch_size), desc="vqa answers", leave=False):
        chunk = questions[s:s + batch_size]
        with torch.no_grad():
            for (i, _), p in zip(chunk, predict_turns(model, data, chunk, batch_size)):
                preds[i].append(p)  # questions run turn by turn within a conversation, so order holds
    truth = [[(q, a, t) for (q, a), t in zip(c, ts)] for c, ts in zip(convs, types)]
    metrics = vqa_accuracy([(p, a, t) for tr, ps in zip(truth, preds) for (_, a, t), p in zip(tr, ps)])
    _, tr_convs, tr_types = frame_conversations(df, "train")
    blind = BlindBaseline((q, a, t) for c, ts in zip(tr_convs, tr_types) for (q, a), t in zip(c, ts))
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
    from vlmpipe import embeddings as emb
    from vlmpipe.data.coco import CocoCaptions
    from vlmpipe.models.captioner import generate, load_captioner

    model = load_captioner(model_dir, device=device)
    cache = emb.load(embeddings_root, "coco", "val", expect_encoder=model.info.get("encoder") or None)
    val, train = CocoCaptions(coco_root, "val"), CocoCaptions(coco_root, "train")
    ids = [int(i) for i in cache.ids.tolist()][: _first(len(cache), limit)]
    with torch.no_grad():
        generated = generate(model, cache.embeddings[[cache.row(i) for i in ids]].float())
    refs = {i: val.captions(i) for i in ids}
    cands = dict(zip(ids, generated))
    metrics = caption_scores(refs, cands, meteor=meteor)
    constant = most_common_caption(c for i in train.ids for c in train.captions(i))
    base = caption_scores(refs, {i: constant for i in ids}, meteor=False)
    metrics.update(baseline_cider=base["cider"], baseline_bleu4=base["bleu4"], baseline_caption=constant,
                   n_images=len(ids))
    return metrics, [(i, cands[i], refs[i]) for i in ids]
