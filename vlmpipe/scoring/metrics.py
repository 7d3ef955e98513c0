"""Held-out metrics, their baselines, plots and the gallery.

Every headline number is reported next to the baseline it must beat:

- captioner: pycocoevalcap BLEU-1..4, ROUGE-L, CIDEr (and METEOR when Java is
  present) against all reference captions; ``baseline_cider`` scores giving
  every image the single most common training caption.
- VQA: normalised exact match, overall and per question type;
  ``blind_baseline`` answers each question with its most frequent training
  answer, without looking at the image. Free-form answers (sentences) also
  get token F1, beside the same blind baseline's.
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


def token_f1(pred: str, truth: str) -> float:
    """The harmonic mean of token precision and recall of ``pred`` against ``truth``, both normalised
    (``normalize_answer``; as SQuAD scores free-form answers): partial credit where exact match has
    none ("blurry" for "The image is blurry." scores 0.5)."""
    p, t = normalize_answer(pred).split(), normalize_answer(truth).split()
    if not p or not t:
        return float(p == t)
    common = sum((Counter(p) & Counter(t)).values())
    if not common:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


def first(n: int, limit: int) -> int:
    """How many of ``n`` held-out items to score: all, or the first ``limit`` (``evaluate.max_images``)."""
    return n if limit <= 0 else min(n, limit)


def round4(d: dict) -> dict:
    """``d`` with every float, in nested dicts too, rounded to 4 places (what reports/metrics.json keeps)."""
    return {k: round4(v) if isinstance(v, dict) else round(v, 4) if isinstance(v, float) else v for k, v in d.items()}
