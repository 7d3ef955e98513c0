"""The report's pictures are written, readable, and say what they show."""
from __future__ import annotations

from PIL import Image

from vlmpipe.evaluate.report import CaptionExample, QAExample, gallery_html, gallery_png, plot_baselines, plot_curves


def _img(color):
    return Image.new("RGB", (32, 32), color)


def test_curves_baselines_and_gallery(tmp_path):
    d = tmp_path / "reports" / "siglip"
    d.mkdir(parents=True)
    (d / "train_curve.csv").write_text("step,epoch,loss,lr\n1,0,2.0,0.1\n2,0,1.5,0.1\n3,1,1.0,0.05\n")
    (d / "val_curve.csv").write_text("epoch,step,zero_shot_acc\n0,2,0.3\n1,3,0.8\n")
    out = tmp_path / "plots"
    written = plot_curves({"siglip": d, "missing": tmp_path / "nope"}, out)
    assert [p.name for p in written] == ["siglip_curves.png"]
    assert Image.open(written[0]).size[0] > 300

    b = plot_baselines([("zero-shot", 0.9, 0.1), ("CIDEr", 3.0, 0.2)], out / "baselines.png")
    assert Image.open(b).format == "PNG"

    caps = [CaptionExample(_img("red"), "a red square", ["a red square", "one red square"])]
    qa = [QAExample(_img("blue"), "square", [("what colour is it?", "blue", "blue"), ("is it round?", "yes", "no")])]
    png = gallery_png(caps, qa, tmp_path / "gallery.png")
    assert Image.open(png).size[1] > 100
    page = gallery_html(caps, qa, {"captioner": {"cider": 2.0, "baseline_cider": 0.2},
                                   "vqa": {"accuracy": 0.5, "blind_baseline": 0.3}},
                        tmp_path / "gallery.html").read_text()
    assert "a red square" in page and "truth: no" in page and "class=bad" in page and "class=ok" in page
    assert page.count("data:image/png;base64,") == 2
    assert "entirely right" not in page
    page = gallery_html(caps, qa, {"captioner": {"cider": 2.0, "baseline_cider": 0.2, "scene_right": 0.25,
                                                 "baseline_scene_right": 0.0}}, tmp_path / "gallery.html").read_text()
    assert "entirely right in 0.250 of the scenes (constant caption 0.000)" in page


def test_the_gallery_shows_each_qa_example_from_its_own_split(tmp_path, tiny_cifar, tiny_coco, monkeypatch):
    """A held-out image of a one-split CSV about the train split is drawn from the train split (its
    example names the split); free-form token F1 stands beside its baseline in the plot."""
    import numpy as np

    from vlmpipe.data.cifar import load_split
    from vlmpipe.evaluate import report

    seen = {}
    monkeypatch.setattr(report, "plot_curves", lambda dirs, out: [])
    monkeypatch.setattr(report, "plot_baselines", lambda pairs, out: seen.setdefault("pairs", pairs) and out)
    monkeypatch.setattr(report, "gallery_png", lambda caps, qa, out, chat=(): seen.setdefault("qa", qa) and out)
    monkeypatch.setattr(report, "gallery_html", lambda caps, qa, metrics, out, chat=(): out)
    metrics = {"siglip": {"zero_shot_acc": 0.9, "zero_shot_chance": 0.1},
               "vqa": {"accuracy": 0.5, "blind_baseline": 0.3, "free_form": {"token_f1": 0.6, "blind_token_f1": 0.2}},
               "captioner": {"cider": 1.0, "baseline_cider": 0.1, "bleu4": 0.2, "baseline_bleu4": 0.1}}
    turns = [("is it blurry?", "no", "No", "unknown")]
    report.evaluation_reports(tmp_path, metrics, [[3, "x", turns], [7, "y", turns, "train"]], [], 2, tiny_coco,
                              tiny_cifar)
    test, train = load_split(tiny_cifar, "test"), load_split(tiny_cifar, "train")
    assert np.array_equal(np.asarray(seen["qa"][0].image), test.images[3])
    assert np.array_equal(np.asarray(seen["qa"][1].image), train.images[7])
    assert ("VQA token F1, free-form", 0.6, 0.2) in seen["pairs"]
    # Real COCO's captioner has no scene score; the shapes world's stands beside its constant caption's.
    assert not [p for p in seen["pairs"] if "entirely right" in p[0]]
    seen.clear()
    metrics["captioner"].update(scene_right=0.4, baseline_scene_right=0.01)
    report.evaluation_reports(tmp_path, metrics, [], [], 2, tiny_coco, tiny_cifar)
    assert ("caption entirely right", 0.4, 0.01) in seen["pairs"]
