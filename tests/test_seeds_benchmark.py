"""benchmarks/seeds.py's and its sweeps' (qa, siglip, captioner) reading of a run (the DAG runs themselves are
the benchmark, not a test)."""
from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _benchmark(name: str):
    """benchmarks/<name>.py as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / f"benchmarks/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _seeds():
    return _benchmark("seeds")


def test_stage_times_are_read_from_the_stages_log_lines():
    out = ("19:07:16 INFO download_coco: download_coco done in 9s\n"
           "19:11:01 INFO train_siglip: train_siglip done in 205s (resumed)\n"
           "19:11:02 INFO vlmpipe.siglip.stage: siglip: done in 3s of something else\n")
    assert _seeds().stage_times(out) == {"download_coco": 9, "train_siglip": 205}


def test_table_gives_each_headline_per_seed_and_mean_sd():
    m = _seeds()
    runs = [{"seed": s, "metrics": {"siglip": {"i2t_r1": r}, "chat": {"by_type": {"followup": f}}},
             "stage_seconds": {"train_siglip": t, "report": 5}} for s, r, f, t in
            [(0, 0.85, 0.4, 200), (1, 0.95, 0.5, 190), (2, 0.97, 0.6, 210)]]
    text = m.table(runs)
    sd = statistics.stdev([0.85, 0.95, 0.97])
    assert f"| SigLIP image→text R@1 (`siglip.i2t_r1`) | 0.850 | 0.950 | 0.970 | 0.923 ± {sd:.3f} |" in text
    assert "(`chat.by_type.followup`) | 0.400 | 0.500 | 0.600 | 0.500 ± 0.100 |" in text
    assert "vqa.accuracy" not in text  # a key no run has is left out
    assert "| train_siglip, s | 200 | 190 | 210 | 200 |" in text
    assert "| **stage time, s** | 205 | 195 | 215 | 205 |" in text


def _qa_sweep():
    return _benchmark("qa_sweep")


def test_qa_sweep_variance_share_is_what_the_groups_explain():
    import pytest
    import torch

    share = _qa_sweep().variance_share
    # Two groups at -1 and +1 along the first axis, spread ±1 along the second: half the variance each.
    x = torch.tensor([[-1.0, 1.0], [-1.0, -1.0], [1.0, 1.0], [1.0, -1.0]])
    assert share(x, ["red", "red", "blue", "blue"]) == pytest.approx(0.5)
    assert share(x, ["red", "blue", "red", "blue"]) == pytest.approx(0.5)   # the other axis
    assert share(x, ["red", "blue", "blue", "red"]) == pytest.approx(0.0)   # groups with the same mean
    assert share(x, ["a", "b", "c", "d"]) == pytest.approx(1.0)             # every point its own group


def test_sweep_variants_are_named_param_changes():
    import pytest

    parse = _seeds().parse_variant
    assert parse("base") == ("base", [])
    assert parse("wd=phi2.train.weight_decay=0.1") == ("wd", ["phi2.train.weight_decay=0.1"])
    assert parse("r64=phi2.lora_r=64,phi2.lora_alpha=128") == ("r64", ["phi2.lora_r=64", "phi2.lora_alpha=128"])
    with pytest.raises(SystemExit, match="expected NAME"):
        parse("wd=0.1")


def test_qa_sweep_table_has_one_row_per_run():
    runs = [{"variant": "base", "seed": 2, "exact_match": 0.822, "by_type": {"colour": 0.34, "class_yesno": 0.48},
             "colour_share": {"features": 0.188, "prefix": 0.017}, "stage_seconds": 121},
            {"variant": "wd", "seed": 2, "exact_match": 0.826, "by_type": {"colour": 0.36}, "colour_share": {},
             "stage_seconds": None}]
    lines = _qa_sweep().table(runs).splitlines()
    assert lines[2] == "| base | 2 | 0.822 | 0.34 | 0.48 | 0.188 → 0.017 | 121 |"
    assert lines[3] == "| wd | 2 | 0.826 | 0.36 | nan | – | – |"


def test_a_stage_run_reads_only_its_evaluations(tmp_path):
    import json
    import shutil

    from vlmpipe.evaluate.stage import SECTIONS

    m = _seeds()
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "reports/eval").mkdir(parents=True)
    for section, score in (("chat", 0.7), ("captioner", 0.4), ("siglip", 0.9)):
        (tmp_path / f"reports/eval/{section}.json").write_text(json.dumps({"metrics": {"score": score}, "examples": []}))
    # siglip.json is there (the committed seed's) but evaluate_siglip did not run: it is not read
    assert m.evaluated(tmp_path, ["evaluate_chat", "evaluate_captioner"]) == {"chat": {"score": 0.7},
                                                                             "captioner": {"score": 0.4}}
    # dvc.yaml's evaluation stages write exactly the files report gathers into reports/metrics.json
    assert m.evaluations() == {"evaluate_siglip": "reports/eval/siglip.json", "evaluate_qa": "reports/eval/vqa.json",
                               "evaluate_captioner": "reports/eval/captioner.json",
                               "evaluate_chat": "reports/eval/chat.json"}
    assert {Path(out).stem for out in m.evaluations().values()} == set(SECTIONS)


def test_each_seed_starts_from_the_committed_params(tmp_path):
    """`dvc exp run -S lr=...` (the --lr timing) leaves its edit in params.yaml; the next seed's run must
    not inherit it (it did once: seeds 1 and 2 trained the QA model at the timed experiment's lr)."""
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "params.yaml").write_text("seed: 0\nlr: 1.0e-3\n")
    git("add", "params.yaml")
    git("commit", "-qm", "params")
    (tmp_path / "params.yaml").write_text("seed: 0\nlr: 2.0e-4\n")  # as `dvc exp run -S lr=2e-4` leaves it
    _seeds().committed_params(tmp_path)
    assert (tmp_path / "params.yaml").read_text() == "seed: 0\nlr: 1.0e-3\n"


def test_siglip_sweep_reads_the_first_epoch_that_reaches_the_target(tmp_path):
    curve = tmp_path / "val_curve.csv"
    curve.write_text("epoch,step,zero_shot_acc,i2t_r1\n1,39,0.2,0.40\n2,78,0.5,0.91\n3,117,0.6,0.88\n4,156,0.7,0.95\n")
    first = _benchmark("siglip_sweep").first_epoch
    assert first(curve, "i2t_r1", 0.9) == 2        # the first crossing, not the last or the best
    assert first(curve, "i2t_r1", 0.95) == 4
    assert first(curve, "i2t_r1", 0.96) is None     # never reached
    assert first(curve, "zero_shot_acc", 0.5) == 2  # any column of the curve


def test_siglip_sweep_table_has_one_row_per_run():
    runs = [{"variant": "base", "seed": 0, "epochs": 24, "zero_shot_acc": 0.979, "i2t_r1": 0.8499, "t2i_r1": 0.888,
             "first_epoch": None, "stage_seconds": 141},
            {"variant": "bs64", "seed": 1, "epochs": 24, "zero_shot_acc": 0.98, "i2t_r1": 0.956, "t2i_r1": 0.986,
             "first_epoch": 17, "stage_seconds": None}]
    lines = _benchmark("siglip_sweep").table(runs, 0.9).splitlines()
    assert "first epoch with R@1 ≥ 0.9" in lines[0]
    assert lines[2] == "| base | 0 | 0.979 | 0.850 | 0.888 | – of 24 | 141 |"
    assert lines[3] == "| bs64 | 1 | 0.980 | 0.956 | 0.986 | 17 of 24 | – |"


def test_sweep_runs_each_seed_and_variant_from_the_committed_params(tmp_path, monkeypatch):
    m = _seeds()
    calls = []
    monkeypatch.setattr(m, "clone_head", lambda work: (work / "repo", "abcdef1234567"))
    monkeypatch.setattr(m, "committed_params", lambda clone: calls.append("restore"))

    def fake_run(cmd, cwd, log, who):
        calls.append(cmd)
        return f"12:00:00 INFO {cmd[3]}: {cmd[3]} done in {len(calls)}s\n", 1.0

    monkeypatch.setattr(m, "run", fake_run)
    variants = [m.parse_variant("base"), m.parse_variant("fast=a.lr=2e-3,a.epochs=3")]
    commit, runs = m.sweep("train_x", [0, 1], variants, tmp_path, "x_sweep", lambda clone: {"score": str(clone)})
    assert commit == "abcdef1234567"
    runs_cmds = [c for c in calls if c != "restore"]
    assert runs_cmds == [["dvc", "exp", "run", "train_x", "-S", "seed=0"],
                         ["dvc", "exp", "run", "train_x", "-S", "seed=0", "-S", "a.lr=2e-3", "-S", "a.epochs=3"],
                         ["dvc", "exp", "run", "train_x", "-S", "seed=1"],
                         ["dvc", "exp", "run", "train_x", "-S", "seed=1", "-S", "a.lr=2e-3", "-S", "a.epochs=3"]]
    # the params are restored before every run (an -S edit stays in params.yaml) and once at the end
    assert [i for i, c in enumerate(calls) if c == "restore"] == [0, 2, 4, 6, 8]
    assert [(r["variant"], r["seed"], r["stage_seconds"]) for r in runs] == [("base", 0, 2), ("fast", 0, 4),
                                                                             ("base", 1, 6), ("fast", 1, 8)]
    assert runs[0]["score"] == str(tmp_path / "repo") and (tmp_path / "x_sweep.log").exists()


def test_captioner_sweep_table_has_one_row_per_run():
    table = _benchmark("captioner_sweep").table
    runs = [{"variant": "e5", "seed": 0, "scene_right": 0.492, "scene_shapes_right": 0.6844, "cider": 4.783,
             "stage_seconds": 62},
            {"variant": "e24", "seed": 1, "scene_right": 0.82, "scene_shapes_right": 0.9098, "cider": 5.2617,
             "stage_seconds": None}]
    lines = table(runs).splitlines()
    assert lines[1] == "|---|---|---|---|---|---|" and "chat" not in lines[0]
    assert lines[2:] == ["| e5 | 0 | 0.492 | 0.684 | 4.783 | 62 |", "| e24 | 1 | 0.820 | 0.910 | 5.262 | – |"]
    runs[0].update(chat_exact_match=0.7081, chat_describe=0.4615)
    runs[1].update(chat_exact_match=0.7961, chat_describe=0.9008)
    lines = table(runs).splitlines()
    assert "| chat exact match | chat descriptions |" in lines[0] and lines[1].count("---") == 8
    assert lines[3] == "| e24 | 1 | 0.820 | 0.910 | 5.262 | 0.796 | 0.901 | – |"


def test_a_sweep_of_several_stages_runs_them_in_one_experiment(tmp_path, monkeypatch):
    """captioner_sweep --chat scores the captioner and the chat model: evaluate_chat does not depend on
    evaluate_captioner, so both are targets of each run, and the first is timed unless told otherwise."""
    m = _seeds()
    calls = []
    monkeypatch.setattr(m, "clone_head", lambda work: (work / "repo", "abcdef1234567"))
    monkeypatch.setattr(m, "committed_params", lambda clone: None)
    log = "12:00:00 INFO evaluate_a: evaluate_a done in 15s\n12:05:00 INFO evaluate_b: evaluate_b done in 9s\n"
    monkeypatch.setattr(m, "run", lambda cmd, cwd, log_file, who: (calls.append(cmd), (log, 30.0))[1])
    _, (run,) = m.sweep(["evaluate_a", "evaluate_b"], [2], [], tmp_path, "x_sweep", lambda clone: {})
    assert calls == [["dvc", "exp", "run", "evaluate_a", "evaluate_b", "-S", "seed=2"]]
    assert run["stage_seconds"] == 15


def test_sweep_times_the_stage_it_is_asked_to(tmp_path, monkeypatch):
    m = _seeds()
    monkeypatch.setattr(m, "clone_head", lambda work: (work / "repo", "abcdef1234567"))
    monkeypatch.setattr(m, "committed_params", lambda clone: None)
    log = "12:00:00 INFO train_x: train_x done in 300s\n12:05:00 INFO evaluate_x: evaluate_x done in 15s\n"
    monkeypatch.setattr(m, "run", lambda cmd, cwd, log_file, who: (log, 320.0))
    _, (timed,) = m.sweep("evaluate_x", [0], [], tmp_path, "x_sweep", lambda clone: {}, timed="train_x")
    _, (default,) = m.sweep("evaluate_x", [0], [], tmp_path, "x_sweep", lambda clone: {})
    assert (timed["stage_seconds"], default["stage_seconds"]) == (300, 15)


def test_a_sweep_report_prints_the_table_and_writes_its_runs(tmp_path, capsys):
    runs = [{"variant": "base", "seed": 0, "score": 0.5}]
    _seeds().report("abcdef1234567", [0, 1], "the scores", "| table |", runs, tmp_path / "out.json")
    assert capsys.readouterr().out == "Commit abcdef1234; seeds [0, 1]; the scores.\n\n| table |\n"
    assert json.loads((tmp_path / "out.json").read_text()) == {"commit": "abcdef1234567", "runs": runs}
