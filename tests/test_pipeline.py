"""The whole DAG, once, on the tiny preset: every stage runs, every model beats its baseline."""
from __future__ import annotations

import json
import re

import pytest

import servers
from PIL import Image

SIGLIP_KEYS = {"zero_shot_acc", "zero_shot_chance", "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "r1_chance"}
VQA_KEYS = {"accuracy", "blind_baseline", "by_type"}
CAPTION_KEYS = {"bleu4", "cider", "rougeL", "meteor", "baseline_cider", "scene_right", "baseline_scene_right"}
CHAT_KEYS = {"exact_match", "blind_baseline", "by_type", "blind_by_type", "followup_no_history", "nll_per_token"}
ALL_STAGES = {"download_coco", "build_cifar_qa_csv", "train_siglip", "precompute_embeddings", "prepare_qa_base",
              "train_phi2_qlora", "train_gpt2_captioner", "build_conversations", "train_gpt2_chat", "evaluate_siglip",
              "evaluate_qa", "evaluate_captioner", "evaluate_chat", "report", "explore_data"}


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
    assert 0 <= c["scene_right"] <= 1 and 0 <= c["baseline_scene_right"] <= 1, c  # the shapes world: captions checked
    ch = m["chat"]
    assert CHAT_KEYS <= set(ch) and set(ch["by_type"]) == {"first", "followup", "describe"}, ch
    val = json.loads((tiny_repo.path / "data/conversations/val.json").read_text())
    assert ch["n_turns"] == sum(len(r["conversations"]) // 2 for r in val) and ch["n_conversations"] == len(val)
    # The tiny captioner is too weak a start for the chat model to beat the blind baseline in a few
    # seconds (the offline default does: README); here it must learn: held-out loss falls by a third.
    import csv

    with open(tiny_repo.path / "reports/chat/val_curve.csv") as f:
        curve = [float(r["val_loss"]) for r in csv.DictReader(f)]
    assert curve[-1] < 0.67 * curve[0] and abs(ch["nll_per_token"] - curve[-1]) < 1e-3, (curve, ch)
    # The QA stage's final scores by type are those of the last epoch's evaluation (its answers, reused),
    # not of an earlier epoch's: the overall exact match is the last row of the curve.
    with open(tiny_repo.path / "reports/phi2_vlm/val_curve.csv") as f:
        qa_curve = [float(r["exact_match"]) for r in csv.DictReader(f)]
    qa = json.loads((tiny_repo.path / "reports/phi2_vlm/metrics.json").read_text())
    assert len(qa_curve) == 2 and abs(qa["exact_match"] - qa_curve[-1]) < 1e-4, (qa_curve, qa["exact_match"])
    assert qa["eval_questions"] == 40 and qa["exact_match_by_type"], qa

    reports = tiny_repo.path / "reports"
    for name in ("siglip", "phi2_vlm", "captioner", "chat"):
        assert (reports / "plots" / f"{name}_curves.png").is_file()
        rows = (reports / name / "train_curve.csv").read_text().splitlines()
        assert len(rows) > 2 and rows[0].startswith("step,")
    assert Image.open(reports / "gallery.png").size[1] > 200
    assert "3. Conversations" in (reports / "data_exploration.html").read_text()  # the last section rendered
    html = (reports / "gallery.html").read_text()
    assert "truth:" in html and "<h2>Chat</h2>" in html and "assistant:" in html


def test_second_repro_has_nothing_to_do(tiny_repo):
    p = servers.run(["dvc", "repro"], cwd=tiny_repo.path, env=tiny_repo.env(), timeout=300)
    out = p.stdout + p.stderr
    assert "Running stage" not in out, out
    assert "up to date" in out


def test_chat_cli_talks_about_a_held_out_image(tiny_repo, tmp_path):
    """`python -m vlmpipe chat`: the QA model through the same interface as the chat model, an interactive
    session on stdin with /reset and /quit, and a model that holds no conversations. (Scripted messages to
    the chat model, one reply line each, are compared with the demo's replies in test_demo.py.)"""
    import zipfile

    with zipfile.ZipFile(tiny_repo.path / "data/coco/val2017.zip") as zf:
        name = sorted(n for n in zf.namelist() if n.endswith(".jpg"))[0]
        img = tmp_path / "scene.jpg"
        img.write_bytes(zf.read(name))
    env, cwd = tiny_repo.env(), tiny_repo.path
    run = ["python", "-m", "vlmpipe", "chat", str(img)]
    p = servers.run([*run, "--model", "qa", "--message", "what colour is it?"], cwd=cwd, env=env, timeout=300)
    assert len(p.stdout.splitlines()) == 1 and p.stdout.strip(), p.stdout
    p = servers.run(run, cwd=cwd, env=env, timeout=300, input="How many shapes are there?\n/reset\n/quit\nnot read\n")
    assert "with chat model" in p.stdout and p.stdout.count("model> ") == 1 and "(conversation reset)" in p.stdout
    bad = servers.run([*run, "--model", "models/captioner", "--message", "hi"], cwd=cwd, env=env, check=False)
    assert bad.returncode != 0 and "holds a captioner model" in bad.stderr and "Traceback" not in bad.stderr


def _status(repo, env) -> dict:
    return json.loads(servers.run(["dvc", "status", "--json"], cwd=repo, env=env, timeout=300).stdout)


def test_editing_output_neutral_code_leaves_the_dag_clean_and_a_template_reruns_its_model_only(tiny_repo, tmp_path):
    """A change to tracking, the preflight, the CLI or the demo retrains nothing; a change to the QA
    model's prompt template names its three stages and no other model's."""
    if not tiny_repo.full_dag:
        pytest.skip("needs the whole tiny DAG")
    repo = tiny_repo.clone(tmp_path / "repo")
    env = tiny_repo.env(repo)
    for f in ("vlmpipe/ops/tracking.py", "vlmpipe/ops/preflight.py", "vlmpipe/face/api.py", "vlmpipe/face/serve.py"):
        with open(repo / f, "a") as fh:
            fh.write("\n# an edit that writes no output\n")
    assert _status(repo, env) == {}
    qa = repo / "vlmpipe/models/qa_model.py"
    text = qa.read_text()
    assert '"Question: {}\\nAnswer:"' in text
    qa.write_text(text.replace('"Question: {}\\nAnswer:"', '"Q: {}\\nA:"'))
    assert sorted(_status(repo, env)) == ["evaluate_qa", "prepare_qa_base", "train_phi2_qlora"]



def _output_digests(repo, stages) -> dict:
    """sha256 of every file the ``stages`` output (checkpoints and speed files aside: they record wall time)."""
    import hashlib

    import yaml

    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    outs = [next(iter(o)) if isinstance(o, dict) else o for s in stages
            for o in spec[s].get("outs", []) + spec[s].get("metrics", [])]
    files = [f for o in outs for f in ([repo / o] if (repo / o).is_file() else sorted((repo / o).rglob("*")))
             if f.is_file() and not {"checkpoints", "speed"} & set(f.parts)]
    return {str(f.relative_to(repo)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_stages_rerun_with_tracking_off_resumed_or_from_scratch_write_the_same_bytes(tiny_repo, tmp_path):
    """One rerun of the tiny DAG's stages with VLMPIPE_TRACKING=off (the DAG was built logging to an MLflow
    server and registering its models), two properties at once:

    - SigLIP, the QA model and the captioner resume at their last checkpoint and save: every output file
      equals the uninterrupted run's (a differing byte, such as the tokenizer's padding state in
      tokenizer.json, reruns every stage after it: hours at full scale);
    - the chat model, its checkpoints removed, trains from the start, and with a data stage, its evaluation
      and the report writes the same bytes: tracking and registration feed no output."""
    if not tiny_repo.full_dag:
        pytest.skip("needs the whole tiny DAG")
    import shutil

    repo = tiny_repo.clone(tmp_path / "repo")
    resumed_stages = ["train_siglip", "train_phi2_qlora", "train_gpt2_captioner"]
    stages = ["build_cifar_qa_csv", *resumed_stages, "train_gpt2_chat", "evaluate_chat", "report"]
    before = _output_digests(repo, stages)
    assert any("tokenizer.json" in f for f in before) and len(before) > 20, sorted(before)
    shutil.rmtree(repo / "models/checkpoints/chat")
    p = servers.run(["dvc", "repro", "--force", "--single-item", *stages], cwd=repo,
                    env=tiny_repo.env(repo, VLMPIPE_TRACKING="off"), timeout=900)
    resumed = re.findall(r"resuming (\S+) from", p.stdout + p.stderr)
    assert sorted(resumed) == ["captioner", "phi2_vlm", "siglip"], (resumed, (p.stdout + p.stderr)[-3000:])
    after = _output_digests(repo, stages)
    assert after == before, sorted(f for f in before if after.get(f) != before[f])
