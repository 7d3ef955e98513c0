"""The whole DAG, once, on the tiny preset: every stage runs, every model beats its baseline."""
from __future__ import annotations

import json

import servers
from PIL import Image

SIGLIP_KEYS = {"zero_shot_acc", "zero_shot_chance", "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "r1_chance"}
VQA_KEYS = {"accuracy", "blind_baseline", "by_type"}
CAPTION_KEYS = {"bleu4", "cider", "rougeL", "meteor", "baseline_cider"}
ALL_STAGES = {"download_coco", "build_cifar_qa_csv", "train_siglip", "precompute_embeddings",
              "train_phi2_qlora", "train_gpt2_captioner", "evaluate"}


def test_whole_dag_runs_and_every_model_beats_its_baseline(tiny_repo):
    assert tiny_repo.full_dag and set(tiny_repo.stages) == ALL_STAGES, tiny_repo.stages
    m = json.loads((tiny_repo.path / "reports" / "metrics.json").read_text())
    assert SIGLIP_KEYS <= set(m["siglip"]) and VQA_KEYS <= set(m["vqa"]) and CAPTION_KEYS <= set(m["captioner"])

    s, v, c = m["siglip"], m["vqa"], m["captioner"]
    # Floors for the tiny preset (a few hundred images, a few epochs): clearly above chance.
    assert s["zero_shot_acc"] > 2 * s["zero_shot_chance"], s
    assert s["i2t_r1"] > s["r1_chance"] and s["t2i_r1"] > s["r1_chance"], s
    assert v["accuracy"] > v["blind_baseline"] + 0.1, v
    assert c["cider"] > 1.3 * c["baseline_cider"], c
    assert c["meteor"] is None or 0 <= c["meteor"] <= 1

    reports = tiny_repo.path / "reports"
    for name in ("siglip", "phi2_vlm", "captioner"):
        assert (reports / "plots" / f"{name}_curves.png").is_file()
        rows = (reports / name / "train_curve.csv").read_text().splitlines()
        assert len(rows) > 2 and rows[0].startswith("step,")
    assert Image.open(reports / "gallery.png").size[1] > 200
    assert "truth:" in (reports / "gallery.html").read_text()


def test_second_repro_has_nothing_to_do(tiny_repo):
    p = servers.run(["dvc", "repro"], cwd=tiny_repo.path, env=tiny_repo.env(), timeout=300)
    out = p.stdout + p.stderr
    assert "Running stage" not in out, out
    assert "up to date" in out
