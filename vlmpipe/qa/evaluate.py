"""The QA model in the evaluate_qa stage: exact match on every held-out question, turn by turn with the
true earlier turns as history, beside the blind baseline; on free-form answers token F1 too; the answers
as examples."""
from __future__ import annotations

import torch
from tqdm import tqdm

from vlmpipe.data import features as embeddings
from vlmpipe.data.conversations import QADataset, frame_conversations
from vlmpipe.data.qa import part, read_qa_csv
from vlmpipe.models.qa_model import load_qa_model
from vlmpipe.qa.heldout import blind_baseline, free_form_types
from vlmpipe.scoring.heldout import predict_turns
from vlmpipe.scoring.metrics import first, normalize_answer, round4, token_f1, vqa_accuracy


@torch.no_grad()
def evaluate(e, *, qa_dir, embeddings_root, csv_path, cifar_root, device="cpu") -> tuple[dict, list]:
    """(the ``vqa`` section of reports/metrics.json, the answers per held-out image) under ``EvaluateParams`` ``e``."""
    df = read_qa_csv(csv_path, cifar_root)
    vqa, examples = evaluate_vqa(qa_dir, embeddings_root, df, e.max_images, csv_path=str(csv_path), device=device)
    keep = ("accuracy", "blind_baseline", "n_questions", "by_type", "blind_by_type", "free_form")
    return round4({k: vqa[k] for k in keep if k in vqa}), examples


def score_vqa(df, truth: list[list[tuple[str, str, str]]], preds: list[list[str]]) -> dict:
    """Exact match of ``preds`` (per held-out conversation, an answer per turn) against ``truth`` (its
    (question, answer, type) turns), overall and by type, beside the blind baseline of the Q/A CSV
    ``df``. When some of the questions are of a free-form type (``free_form_types``), ``free_form``
    names those types and scores their answers by exact match and token F1, beside the blind
    baseline's."""
    metrics = vqa_accuracy([(p, a, t) for tr, ps in zip(truth, preds) for (_, a, t), p in zip(tr, ps)])
    blind = blind_baseline(df)
    blind_acc = vqa_accuracy([(blind(q, t), a, t) for tr in truth for q, a, t in tr])
    metrics["blind_baseline"] = blind_acc["accuracy"]
    metrics["blind_by_type"] = blind_acc["by_type"]
    free = set(free_form_types(df))
    rows = [(p, blind(q, t), a, t) for tr, ps in zip(truth, preds) for (q, a, t), p in zip(tr, ps) if t in free]
    if rows:
        n = len(rows)
        metrics["free_form"] = {
            "types": sorted({t for *_, t in rows}), "n_questions": n,
            "exact_match": sum(normalize_answer(p) == normalize_answer(a) for p, _, a, _ in rows) / n,
            "token_f1": sum(token_f1(p, a) for p, _, a, _ in rows) / n,
            "blind_exact_match": sum(normalize_answer(b) == normalize_answer(a) for _, b, a, _ in rows) / n,
            "blind_token_f1": sum(token_f1(b, a) for _, b, a, _ in rows) / n}
    return metrics


def evaluate_vqa(model_dir, embeddings_root, df, limit: int = 0, batch_size: int = 64,
                 csv_path: str = "data/cifar_qa.csv", device="cpu"):
    """Exact match on held-out questions, asked turn by turn with the true earlier turns as history.

    Returns (metrics, examples) where examples[i] = (dataset index, label, [(q, predicted, truth, type)]),
    and the split after them where it is not the test split; metrics as ``score_vqa`` gives them.
    """
    model = load_qa_model(model_dir, device=device)
    test = part(df, "test").sort_values(["Split", "Dataset_Index"], kind="stable")
    n = first(len(test), limit)
    idx, convs, types = (x[:n] for x in frame_conversations(test, "test"))
    labels = [str(v) for v in test["Class_Label"].tolist()[:n]]
    splits = [str(v) for v in test["Split"].tolist()[:n]]
    feats = embeddings.cifar_features(embeddings_root, splits, idx, model.config.encoder, csv_path).float()
    data = QADataset(model.tokenizer, feats, convs)
    questions = [(i, j) for i, c in enumerate(convs) for j in range(len(c))]
    preds: list[list[str]] = [[] for _ in convs]
    for s in tqdm(range(0, len(questions), batch_size), desc="vqa answers", leave=False):
        chunk = questions[s:s + batch_size]
        for (i, _), p in zip(chunk, predict_turns(model, data, chunk, batch_size)):
            preds[i].append(p)  # questions run turn by turn within a conversation, so order holds
    truth = [[(q, a, t) for (q, a), t in zip(c, ts)] for c, ts in zip(convs, types)]
    metrics = score_vqa(df, truth, preds)
    examples = [[i, lab, [(q, p, a, t) for (q, a, t), p in zip(tr, ps)], *([sp] if sp != "test" else [])]
                for i, lab, tr, ps, sp in zip(idx, labels, truth, preds, splits)]
    return metrics, examples
