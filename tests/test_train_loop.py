"""The shared training loop: resume equals an uninterrupted run (after an exception and after a real
SIGKILL), identity changes start fresh, gradient accumulation, outputs and checkpoint contents."""
from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmpipe.core.errors import UserError
from vlmpipe.loop import train as train_mod
from vlmpipe.loop.train import code_fingerprint, fit, trainable_state

sys.path.insert(0, str(Path(__file__).parent))
from _toy_train import make_cfg, make_task  # noqa: E402

TOY_SCRIPT = Path(__file__).parent / "_toy_train.py"


def _run(tmp: Path, task=None, cfg=None, identity=None, **kw):
    task = task or make_task(**kw)
    res = fit(task, cfg or make_cfg(), seed=0, ckpt_dir=tmp / "ckpt", report_dir=tmp / "reports",
              identity=identity or {"toy": 1})
    return task, res


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_resume_after_a_crash_matches_uninterrupted(tmp_path):
    full_task, full = _run(tmp_path / "full")
    # 24 steps of 16 samples; crash in step 13 (after the checkpoint at step 10, inside epoch 3).
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "resumed", crash_after=12 * 16 + 5)
    assert sorted(p.name for p in (tmp_path / "resumed/ckpt").iterdir()) == ["step_00000010"]
    task, res = _run(tmp_path / "resumed")
    assert res.resumed_from_step == 10
    _assert_same_weights(trainable_state(full_task.model), trainable_state(task.model))
    assert res.metrics == full.metrics
    losses = lambda d: [r["loss"] for r in _rows(d / "reports/train_curve.csv")]  # noqa: E731
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")
    assert _rows(tmp_path / "resumed/reports/val_curve.csv") == _rows(tmp_path / "full/reports/val_curve.csv")


@pytest.mark.slow  # training processes killed and rerun
def test_sigkill_then_rerun_matches_uninterrupted(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def script(d: Path, sleep: float) -> list[str]:
        return [sys.executable, str(TOY_SCRIPT), str(d / "ckpt"), str(d / "reports"), str(d / "w.safetensors"), str(sleep)]

    full = tmp_path / "full"
    subprocess.run(script(full, 0.0), check=True, env=env, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(script(killed, 0.01), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "ckpt/step_00000010").exists():  # the second checkpoint: well inside the run
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    time.sleep(0.3)  # a few more steps past the checkpoint, which the rerun must redo
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "w.safetensors").exists()

    subprocess.run(script(killed, 0.0), check=True, env=env, capture_output=True, timeout=300)
    info = json.loads((killed / "w.safetensors.json").read_text())
    assert info["resumed_from_step"] >= 10
    _assert_same_weights(load_file(full / "w.safetensors"), load_file(killed / "w.safetensors"))
    assert info["metrics"] == json.loads((full / "w.safetensors.json").read_text())["metrics"]


@pytest.mark.slow  # two processes, gloo
def test_two_ranks_with_grad_accumulation_match_one_process(tmp_path):
    """torchrun, 2 ranks x 2 micro-batches of 4 (no_sync on the first) == 1 process x 1 batch of 16."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    out = {}
    for name, cmd in (("one", [sys.executable]), ("two", [str(torchrun), "--standalone", "--nproc_per_node=2"])):
        d = tmp_path / name
        accum = "1" if name == "one" else "2"
        r = subprocess.run(cmd + [str(TOY_SCRIPT), str(d / "ckpt"), str(d / "reports"), str(d / "w.safetensors"),
                                  "0", accum, "1"], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = load_file(d / "w.safetensors")
    for k in out["one"]:
        torch.testing.assert_close(out["one"][k], out["two"][k], rtol=1e-5, atol=1e-6)
    identity = json.loads(next((tmp_path / "two/ckpt").glob("step_*/identity.json")).read_text())
    assert identity["world_size"] == 2


def test_identity_change_starts_fresh_with_a_warning(tmp_path, caplog):
    _run(tmp_path, cfg=make_cfg(epochs=1, checkpoint_every=2))
    assert (tmp_path / "ckpt/step_00000006").exists()
    with caplog.at_level(logging.WARNING, logger="vlmpipe.loop.train"):
        _, res = _run(tmp_path, cfg=make_cfg(epochs=1, checkpoint_every=2), identity={"toy": 2})
    assert res.resumed_from_step == 0
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "different settings" in warning and "toy: 1 -> 2" in warning
    # Same identity again: it resumes the (new) finished run instead of training.
    _, res = _run(tmp_path, cfg=make_cfg(epochs=1, checkpoint_every=2), identity={"toy": 2})
    assert res.resumed_from_step == 6


def test_code_change_starts_fresh(tmp_path, monkeypatch, caplog):
    """DVC reruns a stage when its code changes, and the checkpoint directory persists: the old
    run's final checkpoint must not be taken as this run's result."""
    _run(tmp_path, cfg=make_cfg(epochs=1, checkpoint_every=2))
    monkeypatch.setattr(train_mod, "code_fingerprint", lambda: "edited sources")
    with caplog.at_level(logging.WARNING, logger="vlmpipe.loop.train"):
        _, res = _run(tmp_path, cfg=make_cfg(epochs=1, checkpoint_every=2))
    assert res.resumed_from_step == 0 and res.steps == 6
    assert "code:" in " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_code_fingerprint_covers_the_package_sources(tmp_path, monkeypatch):
    fake_pkg = tmp_path / "vlmpipe"
    fake_pkg.mkdir()
    (fake_pkg / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(train_mod, "__file__", str(fake_pkg / "train.py"))
    before = code_fingerprint()
    (fake_pkg / "a.py").write_text("x = 2\n")
    assert code_fingerprint() != before


def test_code_fingerprint_of_a_stage_is_the_code_it_lists_in_dvc_yaml(tmp_path, monkeypatch):
    """Run as a dvc.yaml stage, a checkpoint's code identity covers the code deps of that stage: an edit
    to code no stage lists (the CLI, tracking) keeps it resumable, as it keeps `dvc status` clean."""
    import __main__

    for rel, text in {"stages/x.py": "main()\n", "pkg/core/a.py": "x = 1\n", "pkg/face/cli.py": "y = 1\n",
                      "data/in.csv": "1\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  make:\n    cmd: echo\n    outs: [data]\n"
        "  x:\n    cmd: python -m vlmpipe.loop.launch stages/x.py\n    deps: [stages/x.py, pkg/core, data/in.csv]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(__main__, "__file__", str(tmp_path / "stages/x.py"), raising=False)
    before = code_fingerprint()
    (tmp_path / "pkg/face/cli.py").write_text("y = 2\n")  # not a dep
    (tmp_path / "data/in.csv").write_text("2\n")  # data: the checkpoint identity's own "data" entry
    assert code_fingerprint() == before
    (tmp_path / "pkg/core/a.py").write_text("x = 2\n")
    assert code_fingerprint() != before
    (tmp_path / "pkg/core/a.py").write_text("x = 1\n")
    (tmp_path / "stages/x.py").write_text("main()  # edited\n")
    assert code_fingerprint() != before


def test_finished_run_resumes_to_the_same_result(tmp_path):
    task1, r1 = _run(tmp_path)
    task2, r2 = _run(tmp_path)
    assert r2.resumed_from_step == r2.steps == 24
    assert r2.metrics == r1.metrics
    _assert_same_weights(trainable_state(task1.model), trainable_state(task2.model))


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    # No BatchNorm and no dropout: then 2 micro-batches of 8 are mathematically one batch of 16.
    a, _ = _run(tmp_path / "a", cfg=make_cfg(grad_accum=1), bn=False, dropout=0.0)
    b, _ = _run(tmp_path / "b", cfg=make_cfg(grad_accum=2), bn=False, dropout=0.0)
    sa, sb = trainable_state(a.model), trainable_state(b.model)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)
    la = [float(r["loss"]) for r in _rows(tmp_path / "a/reports/train_curve.csv")]
    lb = [float(r["loss"]) for r in _rows(tmp_path / "b/reports/train_curve.csv")]
    assert la == pytest.approx(lb, rel=1e-5)


def test_evaluation_does_not_change_training(tmp_path):
    a, _ = _run(tmp_path / "a", evaluate=True)
    b, _ = _run(tmp_path / "b", evaluate=False)
    _assert_same_weights(trainable_state(a.model), trainable_state(b.model))


def test_two_runs_write_the_same_bytes(tmp_path):
    """Checkpoints and curves record no wall time: DVC's hashes of them (and so dvc.lock) come out the
    same from two runs; only the speed file, which DVC does not track, differs."""
    import hashlib

    def digests(root: Path) -> dict:
        return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
                for f in sorted(root.rglob("*")) if f.is_file()}
    _run(tmp_path / "a")
    time.sleep(0.05)  # a different clock
    _run(tmp_path / "b")
    for sub in ("ckpt", "reports"):
        assert digests(tmp_path / "a" / sub) == digests(tmp_path / "b" / sub), sub
    assert len(digests(tmp_path / "a" / "ckpt")) >= 3


def test_outputs_and_checkpoint_contents(tmp_path):
    task, res = _run(tmp_path)
    assert res.steps == 24 and res.samples_per_s > 0 and res.tokens_per_s == pytest.approx(3 * res.samples_per_s)
    rows = _rows(tmp_path / "reports/train_curve.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 25))
    assert res.final_loss == float(rows[-1]["loss"])
    assert list(rows[0]) == ["step", "epoch", "loss", "lr"]  # quality only: speed has its own file
    lrs = [float(r["lr"]) for r in rows]
    warm = round(0.1 * 24)
    assert lrs[:warm] == sorted(lrs[:warm]) and lrs[warm - 1] == pytest.approx(1e-2)  # linear warmup
    assert lrs[warm:] == sorted(lrs[warm:], reverse=True) and lrs[-1] < 1e-3        # cosine decay
    val = _rows(tmp_path / "reports/val_curve.csv")
    assert [(int(r["epoch"]), int(r["step"])) for r in val] == [(1, 6), (2, 12), (3, 18), (4, 24)]
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert metrics["val_mse"] == res.metrics["val_mse"] and metrics["steps"] == 24
    assert not [k for k in metrics if "per_s" in k or "seconds" in k]
    speed = json.loads((tmp_path / "speed/reports.json").read_text())
    assert speed == res.speed and speed["tokens_per_s"] == pytest.approx(3 * speed["samples_per_s"], rel=1e-3)
    assert speed["samples_per_s"] == pytest.approx(24 * 16 / res.train_seconds, rel=1e-3)
    assert "mfu" not in speed  # the toy has no FLOPs formula

    (ck,) = (tmp_path / "ckpt").iterdir()  # older checkpoints are pruned
    assert ck.name == "step_00000024"
    weights = load_file(ck / "trainable.safetensors")
    assert "net.0.weight" in weights and "net.1.running_mean" in weights  # trainable + BatchNorm statistics
    assert not any(k.startswith("frozen.") for k in weights)              # frozen weights are not copied
    state = torch.load(ck / "state.pt", weights_only=True)
    assert state["step"] == 24 and {"optimizer", "scheduler", "rng", "train_rows", "val_rows"} <= set(state)
    assert json.loads((ck / "identity.json").read_text()) == {"toy": 1, "seed": 0, "world_size": 1,
                                                              "code": code_fingerprint()}


def test_batch_size_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="batch_size.*divisible"):
        _run(tmp_path, cfg=make_cfg(batch_size=15, grad_accum=2))
    with pytest.raises(UserError, match="batch_size.*larger than the training set"):
        _run(tmp_path, cfg=make_cfg(batch_size=128))


class _FakeRun:
    def __init__(self) -> None:
        self.metrics: list[tuple[dict, int | None]] = []
        self.artifacts: list[str] = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((dict(metrics), step))

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append(Path(path).name)


def test_mlflow_run_gets_curves_metrics_and_artifacts(tmp_path):
    run = _FakeRun()
    task = make_task()
    fit(task, make_cfg(), seed=0, ckpt_dir=tmp_path / "ckpt", report_dir=tmp_path / "reports", identity={}, run=run)
    train_steps = [s for m, s in run.metrics if "train/loss" in m]
    assert train_steps == list(range(1, 25))  # <= 200 steps: every step
    assert {"train/lr", "speed/samples_per_s", "speed/tokens_per_s"} <= set(run.metrics[0][0])
    assert [s for m, s in run.metrics if "val/val_mse" in m] == [6, 12, 18, 24]
    final = [m for m, s in run.metrics if "final/val_mse" in m]
    assert final and final[0]["final/steps"] == 24
    assert sorted(run.artifacts) == ["metrics.json", "reports.json", "train_curve.csv", "val_curve.csv"]


def test_cpu_kernels_are_pinned_for_cross_machine_reproducibility():
    """A stage imports vlmpipe before torch: PyTorch then dispatches to its AVX2 kernels, whatever
    wider ones the CPU has (the default run is only byte-identical across CPU kinds that way)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")}
    code = "import vlmpipe, os, torch; print(torch.backends.cpu.get_cpu_capability(), os.environ['MKL_CBWR'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] in ("AVX2", "DEFAULT") and out[1] == "AVX2", out  # DEFAULT: a CPU without AVX2
    env["ATEN_CPU_CAPABILITY"] = "default"  # the user's choice wins
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "DEFAULT"


@pytest.mark.slow  # compiling takes ~25 s on a 2-core CPU
def test_compiled_training_follows_the_eager_trajectory(tmp_path):
    """train.compile: true runs the same steps through torch.compile (inductor; here its C++ CPU
    backend): same losses up to kernel-fusion rounding, same checkpoint contents."""
    _, eager = _run(tmp_path / "a", bn=False, dropout=0.0)
    task, compiled = _run(tmp_path / "b", cfg=make_cfg(compile=True), bn=False, dropout=0.0)
    la = [float(r["loss"]) for r in _rows(tmp_path / "a/reports/train_curve.csv")]
    lb = [float(r["loss"]) for r in _rows(tmp_path / "b/reports/train_curve.csv")]
    assert la == pytest.approx(lb, rel=1e-4)
    assert set(load_file(next((tmp_path / "b/ckpt").iterdir()) / "trainable.safetensors")) == \
        set(trainable_state(task.model))
