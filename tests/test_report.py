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
