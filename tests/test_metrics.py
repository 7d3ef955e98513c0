"""Caption and VQA scoring, and the baselines the models must beat."""
from __future__ import annotations

import shutil

import pytest

from vlmpipe.scoring.metrics import (BlindBaseline, caption_scores, most_common_caption,
                                normalize_answer, tokenize_caption, vqa_accuracy)

REFS = {
    1: ["a red circle on the left", "red circle at left", "a small red circle", "one red circle", "the red circle"],
    2: ["a blue square above a green star", "blue square over a green star", "a square and a star",
        "blue square, green star", "two shapes: a blue square and a green star"],
    3: ["a yellow triangle", "yellow triangle in the middle", "a single yellow triangle", "one triangle",
        "the yellow triangle"],
}


def test_tokenize_and_normalize():
    assert tokenize_caption("A Red, circle!") == "a red circle"
    assert normalize_answer("The  Red.") == "red"
    assert normalize_answer("an airplane") == "airplane"


def test_caption_scores_rank_good_above_constant():
    good = {1: "a red circle on the left", 2: "a blue square above a green star", 3: "a yellow triangle"}
    const = {i: "a red circle" for i in REFS}
    s_good, s_const = caption_scores(REFS, good, meteor=False), caption_scores(REFS, const, meteor=False)
    for k in ("bleu4", "cider", "rougeL"):
        assert s_good[k] > s_const[k], k
    assert s_good["bleu1"] > 0.9
    assert s_good["cider"] > 2 * s_const["cider"]


@pytest.mark.skipif(shutil.which("java") is None, reason="java not installed: METEOR cannot run")
def test_meteor_runs_with_java():
    s = caption_scores(REFS, {1: "a red circle", 2: "a blue square", 3: "a yellow triangle"})
    assert s["meteor"] is not None and 0 < s["meteor"] <= 1


def test_meteor_is_null_with_reason_without_java(monkeypatch):
    import vlmpipe.scoring.metrics as ev

    monkeypatch.setattr(ev.shutil, "which", lambda name: None)
    s = caption_scores(REFS, {1: "a red circle", 2: "a blue square", 3: "a yellow triangle"})
    assert s["meteor"] is None and "java" in s["meteor_skipped"]
    assert s["cider"] > 0


def test_most_common_caption_counts_after_tokenising():
    caps = ["A red circle.", "a red circle", "a blue square", "b", "b"]
    assert most_common_caption(caps) == "a red circle"


def test_blind_baseline_uses_training_answer_counts():
    train = [("what colour is it?", "red", "colour"), ("What colour is it", "red", "colour"),
             ("what colour is it?", "blue", "colour"), ("how many sides?", "four", "fact_sides")]
    b = BlindBaseline(train)
    assert b("What colour is it?", "colour") == "red"
    assert b("how many sides?") == "four"
    assert b("what hue is it?", "colour") == "red"  # unseen question: its type's answer
    assert b("never seen", "no_such_type") == "red"  # overall most frequent


def test_vqa_accuracy_by_type():
    r = vqa_accuracy([("Red", "red", "colour"), ("blue", "red", "colour"), ("the cat", "cat", "class")])
    assert r["accuracy"] == pytest.approx(2 / 3)
    assert r["by_type"] == {"class": 1.0, "colour": 0.5}
    with pytest.raises(ValueError):
        vqa_accuracy([])


def test_token_f1_gives_partial_credit_after_normalising():
    from vlmpipe.scoring.metrics import token_f1

    assert token_f1("The image is blurry.", "the image is BLURRY") == 1.0  # case, punctuation, articles
    assert token_f1("blurry", "The image is blurry.") == pytest.approx(2 * (1 / 3) / (1 + 1 / 3))  # p 1, r 1/3
    assert token_f1("a red red car", "red car parked") == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert token_f1("No", "Yes") == 0.0
    assert token_f1("", "the") == 1.0 and token_f1("", "No") == 0.0  # both empty after normalising: equal
