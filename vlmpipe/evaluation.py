"""Held-out metrics, their baselines, plots and the gallery.

Every headline number is reported next to the baseline it must beat:

- captioner: pycocoevalcap BLEU-1..4, ROUGE-L, CIDEr (and METEOR when Java is
  present) against all reference captions; ``baseline_cider`` scores giving
  every image the single most common training caption.
- VQA: normalised exact match, overall and per question type;
  ``blind_baseline`` answers each question with its most frequent training
  answer, without looking at the image.
- SigLIP: zero-shot accuracy and recall@1/5 both ways, with chance levels.

Captions are tokenised in Python (lower-case, punctuation stripped — what the
PTB tokenizer does to such text) for every scorer, so BLEU/ROUGE-L/CIDEr are
the same numbers with or without Java; only METEOR needs Java.
"""
from __future__ import annotations

import logging
import re
import shutil
import string
from collections import Counter, defaultdict
from typing import Iterable, Mapping, Sequence

import torch

log = logging.getLogger(__name__)

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def tokenize_caption(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def normalize_answer(text: str) -> str:
    """VQA-style normalisation: lower-case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", _PUNCT.sub(" ", text.lower())).split())


# ---------------------------------------------------------------- captioning

def caption_scores(references: Mapping[int, Sequence[str]], candidates: Mapping[int, str],
                   meteor: bool = True) -> dict:
    """pycocoevalcap scores of ``candidates`` (one caption per image id) against all references.

    Returns bleu1..bleu4, rougeL, cider, and meteor (None with ``meteor_skipped``
    giving the reason when Java is missing or ``meteor`` is False — the METEOR
    jar takes ~10 s to start, too slow for per-epoch use).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = sorted(candidates)
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise ValueError(f"no reference captions for image ids {missing[:5]}")
    gts = {i: [tokenize_caption(r) for r in references[i]] for i in ids}
    res = {i: [tokenize_caption(candidates[i]) or "empty"] for i in ids}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    out = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
    out.update(rougeL=float(rouge), cider=float(cider), meteor=None)
    if not meteor:
        out["meteor_skipped"] = "not requested"
    elif shutil.which("java") is None:
        out["meteor_skipped"] = "java not found on PATH (METEOR runs the Java METEOR 1.5 jar)"
        log.warning("METEOR skipped: %s", out["meteor_skipped"])
    else:
        from pycocoevalcap.meteor.meteor import Meteor

        try:
            m = Meteor()
            try:
                out["meteor"] = float(m.compute_score(gts, res)[0])
            finally:
                m.meteor_p.kill()
                m.meteor_p.wait()
        except (OSError, ValueError) as e:  # a broken JVM: report it, keep the other scores
            out["meteor_skipped"] = f"METEOR failed: {e}"
            log.warning("METEOR skipped: %s", out["meteor_skipped"])
    return out


def most_common_caption(train_captions: Iterable[str]) -> str:
    """The single most frequent (tokenised) training caption; ties broken alphabetically."""
    counts = Counter(tokenize_caption(c) for c in train_captions)
    best = max(counts.values())
    return min(c for c, n in counts.items() if n == best)


# ---------------------------------------------------------------------- VQA

class BlindBaseline:
    """Answers a question with its most frequent training answer, never seeing the image.

    Keyed by the normalised question text; a question never seen in training
    falls back to the most frequent answer of its type, then overall.
    """

    def __init__(self, train_qa: Iterable[tuple[str, str, str]]) -> None:
        by_q: dict[str, Counter] = defaultdict(Counter)
        by_t: dict[str, Counter] = defaultdict(Counter)
        overall: Counter = Counter()
        for question, answer, qtype in train_qa:
            a = normalize_answer(answer)
            by_q[normalize_answer(question)][a] += 1
            by_t[qtype][a] += 1
            overall[a] += 1

        def top(c: Counter) -> str:
            best = max(c.values())
            return min(a for a, n in c.items() if n == best)

        self._q = {q: top(c) for q, c in by_q.items()}
        self._t = {t: top(c) for t, c in by_t.items()}
        self._all = top(overall) if overall else ""

    def __call__(self, question: str, qtype: str = "unknown") -> str:
        return self._q.get(normalize_answer(question)) or self._t.get(qtype) or self._all


def vqa_accuracy(rows: Iterable[tuple[str, str, str]]) -> dict:
    """``rows`` of (prediction, truth, question type) → accuracy overall and by type."""
    hits: dict[str, list[int]] = defaultdict(list)
    allhits: list[int] = []
    for pred, truth, qtype in rows:
        ok = int(normalize_answer(pred) == normalize_answer(truth))
        hits[qtype].append(ok)
        allhits.append(ok)
    if not allhits:
        raise ValueError("no questions to score")
    return {
        "accuracy": sum(allhits) / len(allhits),
        "n_questions": len(allhits),
        "by_type": {t: sum(v) / len(v) for t, v in sorted(hits.items())},
    }


# ------------------------------------------------------------ the evaluate stage

def _first(n: int, limit: int) -> int:
    return n if limit <= 0 else min(n, limit)


def evaluate_siglip(siglip_dir, cifar_root, df, limit: int = 0) -> dict:
    """Zero-shot accuracy and recall@1/5 both ways on held-out CIFAR, with chance levels."""
    from vlmpipe.data.cifar import load_split
    from vlmpipe.models.siglip import image_texts, load_siglip, retrieval_metrics

    model = load_siglip(siglip_dir)
    test = load_split(cifar_root, "test")
    n = _first(len(test), limit)
    texts = image_texts(df, "test", len(test), test.label_names)
    # Retrieval over the images whose composed caption names class, colour and background,
    # exactly as train_siglip reports it per epoch.
    captions = [c if ok else None for c, ok in zip(texts.captions[:n], texts.complete[:n])]
    with torch.no_grad():
        return retrieval_metrics(model, test.images[:n], test.labels[:n], texts.prompts, captions)


def evaluate_vqa(model_dir, embeddings_root, df, limit: int = 0, batch_size: int = 64):
    """Exact match on held-out questions, asked turn by turn with the true earlier turns as history.

    Returns (metrics, examples) where examples[i] = (dataset index, label, [(q, predicted, truth, type)]).
    """
    from vlmpipe import embeddings as emb
    from vlmpipe.data.qa import A_COLS, Q_COLS, T_COLS
    from vlmpipe.models.phi_vlm import answer_batch, load_vlm

    model = load_vlm(model_dir, device="cpu")
    cache = emb.load(embeddings_root, "cifar", "test", expect_encoder=model.info.get("encoder") or None)
    test = df[df["Split"] == "test"].sort_values("Dataset_Index")
    rows = [r._asdict() for r in test.itertuples(index=False)][: _first(len(test), limit)]
    convs = [[(r[q], r[a], r[t]) for q, a, t in zip(Q_COLS, A_COLS, T_COLS) if r[q]] for r in rows]
    preds: list[list[str]] = [[] for _ in rows]
    feats = cache.embeddings[[cache.row(int(r["Dataset_Index"])) for r in rows]].float()
    from tqdm import tqdm

    bar = tqdm(total=sum(map(len, convs)), desc="vqa answers", leave=False)
    for turn in range(max(map(len, convs), default=0)):
        todo = [i for i, c in enumerate(convs) if len(c) > turn]
        for s in range(0, len(todo), batch_size):
            idx = todo[s:s + batch_size]
            with torch.no_grad():
                answers = answer_batch(model, feats[idx], [convs[i][turn][0] for i in idx],
                                       [[(q, a) for q, a, _ in convs[i][:turn]] for i in idx])
            for i, a in zip(idx, answers):
                preds[i].append(a)
            bar.update(len(idx))
    bar.close()
    scored = [(p, truth, t) for c, ps in zip(convs, preds) for (q, truth, t), p in zip(c, ps)]
    metrics = vqa_accuracy(scored)
    train_qa = [(r[q], r[a], r[t]) for r in (x._asdict() for x in df[df["Split"] == "train"].itertuples(index=False))
                for q, a, t in zip(Q_COLS, A_COLS, T_COLS) if r[q]]
    blind = BlindBaseline(train_qa)
    blind_acc = vqa_accuracy([(blind(q, t), truth, t) for c in convs for q, truth, t in c])
    metrics["blind_baseline"] = blind_acc["accuracy"]
    metrics["blind_by_type"] = blind_acc["by_type"]
    examples = [(int(r["Dataset_Index"]), str(r["Class_Label"]),
                 [(q, p, truth, t) for (q, truth, t), p in zip(c, ps)]) for r, c, ps in zip(rows, convs, preds)]
    return metrics, examples


def evaluate_captioner(model_dir, embeddings_root, coco_root, limit: int = 0, meteor: bool = True):
    """pycocoevalcap scores on the held-out (val) split + the constant-caption baseline.

    Returns (metrics, examples) where examples = [(image id, generated, references)].
    """
    from vlmpipe import embeddings as emb
    from vlmpipe.data.coco import CocoCaptions
    from vlmpipe.models.captioner import generate, load_captioner

    model = load_captioner(model_dir, device="cpu")
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
