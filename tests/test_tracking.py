"""MLflow tracking: one run per stage execution, tags, params, metrics, artifacts;
a dead or refusing server costs one warning and seconds, never the run; no secret
ever reaches MLflow.

Fast tests drive `vlmpipe.ops.tracking` directly against a sqlite store in tmp_path
(the default store) and against loopback servers that are dead or refuse. The
end-to-end tests read back, from a real `mlflow server`, the runs that the
session's tiny pipeline (conftest `tiny_repo`) logged, and run a stage against a
dead port.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

import servers
from servers import FAKE_SECRETS

ROOT = Path(__file__).resolve().parents[1]

# The namespace of each model stage's MLflow metric names (reports/metrics.json's sections).
MODEL_OF = {"train_siglip": "siglip", "evaluate_siglip": "siglip", "train_phi2_qlora": "vqa", "evaluate_qa": "vqa",
            "train_gpt2_captioner": "captioner", "evaluate_captioner": "captioner", "train_gpt2_chat": "chat",
            "evaluate_chat": "chat"}

# The stage run directly against a dead tracking port (cheap, and it must log).
DEAD_SERVER_STAGE = "build_cifar_qa_csv"

# Every variable tracking.py reads or sets: restored after each in-process test.
_TRACKING_ENV = ["MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "VLMPIPE_TRACKING",
                 "MLFLOW_DISABLE_TELEMETRY", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT", *FAKE_SECRETS]


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An initialised, empty MLflow sqlite database (creating one runs ~10 s of schema
    migrations on this machine): tests copy it to where the default store lives."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def env(monkeypatch, tmp_path, empty_store):
    """A clean tracking environment; cwd = a fresh git repository in tmp_path with an
    empty store at its default place (repo/mlflow.db)."""
    for k in _TRACKING_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "x"],
                   cwd=repo, check=True)
    shutil.copy2(empty_store, repo / "mlflow.db")
    monkeypatch.chdir(repo)
    return monkeypatch


def _client(db: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{db}")


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vlmpipe.ops.tracking" and r.levelno >= logging.WARNING]


def test_stage_run_logs_params_metrics_tags_artifacts(env, tmp_path):
    from vlmpipe.ops import tracking

    repo = Path.cwd()
    (repo / "curve.csv").write_text("step,loss\n0,1.0\n")
    (repo / "model").mkdir()
    (repo / "model" / "config.json").write_text("{}")
    import numpy as np

    with tracking.stage_run("train_x", {"x.train.lr": 0.001, "x.layers": 2, "seed": 0}) as run:
        for step, loss in enumerate([3.0, 2.0, 1.5]):
            run.log_metrics({"loss": np.float32(loss), "lr": 1e-3, "note": "skipped: not a number"}, step=step)
        run.log_metrics({"val/acc@1": 0.9})  # final; '@' is not allowed in an MLflow key
        run.log_artifact(repo / "curve.csv")
        run.log_artifact(repo / "model")
        run.log_artifact(repo / "missing.txt")  # ignored
        run.set_tags({"extra": "yes"})
        run_id = run.run_id
    assert run_id and not run.active

    c = _client(repo / "mlflow.db")  # the default store: sqlite:///mlflow.db in the repository
    r = c.get_run(run_id)
    assert r.info.status == "FINISHED"
    assert c.get_experiment(r.info.experiment_id).name == "vlmpipe"
    assert r.data.params == {"x.train.lr": "0.001", "x.layers": "2", "seed": "0"}
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "loss")] == [(0, 3.0), (1, 2.0), (2, 1.5)]
    assert r.data.metrics["val/acc_1"] == pytest.approx(0.9)
    assert "note" not in r.data.metrics
    tags = r.data.tags
    assert tags["stage"] == "train_x"
    assert tags["git_commit"] == subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                                text=True).stdout.strip()
    assert tags["extra"] == "yes"
    assert "dvc_experiment" not in tags
    arts = {a.path for a in c.list_artifacts(run_id)}
    assert arts == {"curve.csv", "model"}
    assert [a.path for a in c.list_artifacts(run_id, "model")] == ["model/config.json"]
    # Artifacts beside the store, not wherever the process happened to run.
    assert (repo / "mlartifacts").is_dir()


def test_dvc_experiment_name_tag_and_store_under_dvc_root(env, tmp_path):
    """Under `dvc exp run` DVC exports DVC_EXP_NAME / DVC_EXP_BASELINE_REV / DVC_ROOT
    (also in --temp workspaces, where cwd is a temporary copy): the run carries the
    name, and the default store is the user's repository, not the temporary copy."""
    from vlmpipe.ops import tracking

    repo, workspace = Path.cwd(), tmp_path / "exp-workspace"
    workspace.mkdir()
    env.chdir(workspace)
    assert not (workspace / "mlflow.db").exists()
    env.setenv("DVC_ROOT", str(repo))
    env.setenv("DVC_EXP_NAME", "lucky-lark")
    env.setenv("DVC_EXP_BASELINE_REV", "0123abcd")
    with tracking.stage_run("train_x", {"lr": 1e-4}) as run:
        run.log_metrics({"loss": 1.0}, step=1)
    assert not (workspace / "mlflow.db").exists()
    r = _client(repo / "mlflow.db").get_run(run.run_id)
    assert r.data.tags["dvc_experiment"] == "lucky-lark"
    assert r.data.tags["dvc_baseline_rev"] == "0123abcd"
    assert r.info.run_name == "train_x@lucky-lark"


def test_metric_names_carry_the_model_and_the_experiment_opens_on_its_runs(env):
    """Two models' metrics never share a key (QA's and chat's exact match used to meet in one chart);
    the experiment is tagged as model training, so the MLflow UI opens it on its runs, not on traces."""
    from vlmpipe.ops import tracking

    with tracking.stage_run("evaluate_qa", model="vqa") as qa:
        qa.log_metrics({"exact_match": 0.9, "by_type.colour": 0.8})
    with tracking.stage_run("evaluate_chat", model="chat") as chat:
        chat.log_metrics({"exact_match": 0.5})
    c = _client(Path.cwd() / "mlflow.db")
    assert c.get_run(qa.run_id).data.metrics == {"vqa/exact_match": 0.9, "vqa/by_type.colour": 0.8}
    assert c.get_run(chat.run_id).data.metrics == {"chat/exact_match": 0.5}
    exp = c.get_experiment_by_name("vlmpipe")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_git_dirty_ignores_the_files_dvc_writes(env):
    """DVC rewrites dvc.lock (and .gitignore) between stages, the outputs dvc.yaml declares (those kept in
    git too) and params.yaml under `dvc exp run -S`: the code is still the commit's. A change to code is
    dirty."""
    from vlmpipe.ops import tracking

    repo = Path.cwd()
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for name in ("dvc.lock", "params.yaml", "data.dvc", "train.py", "reports/x/curve.csv", "reports/m.json"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("a: 1\n")
    (repo / ".gitignore").write_text("/mlflow.db\n/mlartifacts\n")
    # Outputs kept in git (cache: false): DVC removes them before their stage runs, the stage rewrites them.
    (repo / "dvc.yaml").write_text("stages:\n  x:\n    cmd: python train.py\n    outs:\n      - reports/x:\n"
                                   "          cache: false\n    metrics:\n      - reports/m.json:\n"
                                   "          cache: false\n")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "files"], cwd=repo, check=True)
    for name in ("dvc.lock", "params.yaml", "data.dvc", "reports/m.json"):
        (repo / name).write_text("a: 2\n")
    (repo / "reports/x/curve.csv").unlink()
    (repo / ".gitignore").write_text("/mlflow.db\n/mlartifacts\n/data\n")  # as DVC adds an output
    with tracking.stage_run("train_x") as clean:
        pass
    (repo / "train.py").write_text("a: 2\n")
    with tracking.stage_run("train_x") as dirty:
        pass
    c = _client(repo / "mlflow.db")
    assert c.get_run(clean.run_id).data.tags["git_dirty"] == "false"
    assert c.get_run(dirty.run_id).data.tags["git_dirty"] == "true"


# A stand-in for the `dvc` command: it runs each argument as a stage command through the shell, as
# `dvc repro` does (DVC_ROOT set), one after the other.
_FAKE_DVC = """import os, subprocess, sys
for cmd in sys.argv[1:]:
    subprocess.run(cmd, shell=True, check=True, env={**os.environ, "DVC_ROOT": os.getcwd()})
"""
_STAGE = ("from vlmpipe.ops import tracking\n"
          "with tracking.stage_run({name!r}, model='m') as run:\n"
          "    run.log_metrics({{'loss': 1.0}})\n")


@pytest.mark.slow  # four stage processes under two stand-in dvc commands
def test_the_stages_of_one_dvc_command_nest_under_one_parent_run(env, tmp_path):
    """Two commands, two stages each: each command's stages sit under one parent run of their own, which
    ends with its last stage. A stage run by hand (no DVC around it) has no parent."""
    repo = Path.cwd()
    dvc = tmp_path / "bin" / "dvc"
    dvc.parent.mkdir()
    dvc.write_text(_FAKE_DVC)
    stage_cmds = [f"{sys.executable} -c \"{_STAGE.format(name=n)}\"" for n in ("stage_a", "stage_b")]
    run_env = dict(os.environ)
    run_env["PYTHONPATH"] = str(ROOT)
    for _ in range(2):
        subprocess.run([sys.executable, str(dvc), *stage_cmds], cwd=repo, env=run_env, check=True, timeout=300)
    from vlmpipe.ops import tracking

    with tracking.stage_run("by_hand") as alone:
        pass
    c = _client(repo / "mlflow.db")
    exp = c.get_experiment_by_name("vlmpipe")
    runs = c.search_runs([exp.experiment_id])
    stages = [r for r in runs if r.data.tags.get("stage") in ("stage_a", "stage_b")]
    parents = {r.data.tags.get("mlflow.parentRunId") for r in stages}
    assert len(stages) == 4 and len(parents) == 2 and None not in parents, parents
    for pid in parents:
        parent = c.get_run(pid)
        assert parent.info.run_name == "dvc repro" and parent.info.status == "FINISHED"
        assert parent.data.tags[tracking.INVOCATION_TAG]
        children = [r for r in stages if r.data.tags["mlflow.parentRunId"] == pid]
        assert sorted(r.data.tags["stage"] for r in children) == ["stage_a", "stage_b"]
        assert parent.info.end_time >= max(r.info.end_time for r in children)
    assert "mlflow.parentRunId" not in c.get_run(alone.run_id).data.tags


def test_a_moved_checkout_keeps_its_runs_and_logs_beside_itself(env, tmp_path):
    """MLflow stores absolute artifact locations; after the checkout moves, the next run re-points them at
    the mlartifacts/ beside the database: old artifacts read back, new ones land in the moved checkout."""
    from vlmpipe.ops import tracking

    repo = Path.cwd()
    (repo / "curve.csv").write_text("step,loss\n0,1.0\n")
    with tracking.stage_run("train_x") as before:
        before.log_artifact(repo / "curve.csv")
    moved = tmp_path / "elsewhere" / "checkout"
    moved.parent.mkdir()
    env.chdir(tmp_path)
    shutil.move(str(repo), str(moved))
    env.chdir(moved)
    with tracking.stage_run("train_x") as after:
        after.log_artifact(moved / "curve.csv")
    assert not repo.exists()
    c = _client(moved / "mlflow.db")
    for run in (before, after):
        uri = c.get_run(run.run_id).info.artifact_uri
        assert uri.startswith((moved / "mlartifacts").as_uri()), uri
        local = c.download_artifacts(run.run_id, "curve.csv", str(tmp_path / run.run_id))
        assert Path(local).read_text().startswith("step,loss")
    assert c.get_experiment_by_name("vlmpipe").artifact_location == (moved / "mlartifacts").as_uri()


def test_failed_stage_marks_run_failed_and_reraises(env):
    from vlmpipe.ops import tracking

    with pytest.raises(ValueError):
        with tracking.stage_run("train_x") as run:
            raise ValueError("boom")
    assert _client(Path.cwd() / "mlflow.db").get_run(run.run_id).info.status == "FAILED"


def test_disabled_runs_are_inert(env):
    from vlmpipe.ops import tracking

    with tracking.stage_run("train_x", {"a": 1}, enabled=False) as run:  # e.g. DDP rank 1
        run.log_metrics({"loss": 1.0}, step=0)
        run.log_artifact(__file__)
    env.setenv("VLMPIPE_TRACKING", "off")
    with tracking.stage_run("train_x", {"a": 1}) as run2:
        run2.log_metrics({"loss": 1.0})
    assert run.run_id is None and run2.run_id is None
    c = _client(Path.cwd() / "mlflow.db")
    assert c.get_experiment_by_name("vlmpipe") is None


def test_dead_server_one_warning_and_quick(env, caplog):
    from vlmpipe.ops import tracking

    env.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{servers.dead_port()}")
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO):
        with tracking.stage_run("train_x", {"a": 1}) as run:
            for step in range(50):
                run.log_metrics({"loss": 1.0}, step=step)
            run.log_artifact(__file__)
            run.set_tags({"a": "b"})
    assert time.monotonic() - t0 < 5
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "unreachable" in warnings[0], warnings
    assert not run.active


class _Refusing:
    """A loopback HTTP server that answers every request with ``status``."""

    def __init__(self, status: int) -> None:
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:
                pass

            def _answer(self) -> None:
                outer.requests += 1
                body = json.dumps({"error_code": "PERMISSION_DENIED", "message": "go away"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _answer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("status", [403, 503])
def test_refusing_server_one_warning_and_quick(env, caplog, status):
    """403: refused outright. 503: MLflow's client retries; bounded to seconds, not minutes."""
    from vlmpipe.ops import tracking

    srv = _Refusing(status)
    try:
        env.setenv("MLFLOW_TRACKING_URI", srv.uri)
        t0 = time.monotonic()
        with caplog.at_level(logging.INFO):
            with tracking.stage_run("train_x", {"a": 1}) as run:
                for step in range(20):
                    run.log_metrics({"loss": 1.0}, step=step)
        elapsed = time.monotonic() - t0
    finally:
        srv.close()
    assert elapsed < 30, f"{elapsed:.0f}s against a refusing server"
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert srv.requests <= 6, f"{srv.requests} requests: tracking kept calling a refusing server"


def test_store_failing_mid_run_one_warning(env, caplog):
    """The store goes away after the run started: one warning, then quiet no-ops."""
    from vlmpipe.ops import tracking

    with caplog.at_level(logging.INFO):
        with tracking.stage_run("train_x") as run:
            run.log_metrics({"loss": 1.0}, step=0)

            def broken(*a, **k):
                raise ConnectionError("server went away")

            run._client.log_batch = broken
            run._client.log_artifact = broken
            for step in range(1, 10):
                run.log_metrics({"loss": 1.0}, step=step)
            run.log_artifact(__file__)
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "server went away" in warnings[0], warnings


def test_secrets_never_reach_mlflow_sqlite(tmp_path, empty_store):
    """Credentials in the environment, in a param or tag value, under a secret-looking
    key, or in a git remote URL: none lands in the store, the artifacts or the log."""
    repo = tmp_path / "repo"
    repo.mkdir()
    secret = FAKE_SECRETS["AWS_SECRET_ACCESS_KEY"]
    token = FAKE_SECRETS["GITHUB_TOKEN"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "remote", "add", "origin", f"https://user:{token}@github.com/acme/vlmpipe.git"],
                   cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "x"],
                   cwd=repo, check=True)
    shutil.copy2(empty_store, repo / "mlflow.db")
    script = f"""
import logging, os
logging.basicConfig(level=logging.DEBUG)
from vlmpipe.ops.tracking import stage_run
params = {{"qa.csv_path": "s3://bucket/qa.csv", "remote.url": "https://me:{secret}@s3.example.com/b",
          "aws_secret_access_key": "{secret}", "note": "key=" + os.environ["AWS_ACCESS_KEY_ID"]}}
with stage_run("train_x", params, tags={{"hf_token": "{FAKE_SECRETS['HF_TOKEN']}",
                                         "endpoint": "http://u:{secret}@h"}}) as run:
    run.log_metrics({{"loss": 1.0}}, step=0)
    run.set_tags({{"session": os.environ["AWS_SESSION_TOKEN"]}})
# A tracking URI with credentials in it, unreachable: the warning must not show them.
os.environ["MLFLOW_TRACKING_URI"] = "http://me:{FAKE_SECRETS['MLFLOW_TRACKING_PASSWORD']}@127.0.0.1:{servers.dead_port()}"
with stage_run("train_y") as run:
    pass
"""
    env = servers.clean_env(PYTHONPATH=str(ROOT), **FAKE_SECRETS)
    p = subprocess.run([sys.executable, "-c", script], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert "http://***@127.0.0.1" in p.stderr and "unreachable" in p.stderr, p.stderr[-2000:]
    stored = [repo / "mlflow.db", *(f for f in (repo / "mlartifacts").rglob("*") if f.is_file())]
    assert (repo / "mlflow.db").exists()
    _assert_no_secrets(stored, extra_text={"stage output": p.stdout + p.stderr}, also=[token])
    # ...while the run itself is there, with the harmless values intact.
    c = _client(repo / "mlflow.db")
    (r,) = c.search_runs([c.get_experiment_by_name("vlmpipe").experiment_id])
    assert r.data.params["qa.csv_path"] == "s3://bucket/qa.csv"
    assert r.data.params["aws_secret_access_key"] == "***"
    assert r.data.params["remote.url"] == "https://***@s3.example.com/b"


def _assert_no_secrets(files: list[Path], extra_text: dict[str, str] | None = None, also: list[str] = ()) -> None:
    needles = [*FAKE_SECRETS.values(), *also]
    for f in files:
        data = f.read_bytes()
        for n in needles:
            assert n.encode() not in data, f"secret {n[:6]}... found in {f}"
    for where, text in (extra_text or {}).items():
        for n in needles:
            assert n not in text, f"secret {n[:6]}... found in {where}"


# ---------------------------------------------------------------- end to end


def _runs_by_stage(server, repo_commit: str | None = None) -> dict[str, list]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=server.uri)
    exp = c.get_experiment_by_name("vlmpipe")
    assert exp is not None, "no 'vlmpipe' experiment on the server"
    out: dict[str, list] = {}
    for r in c.search_runs([exp.experiment_id], max_results=1000):
        out.setdefault(r.data.tags.get("stage"), []).append(r)
    return out


def test_pipeline_runs_read_back_from_mlflow_server(tiny_repo):
    """Each stage of the tiny DAG ran once under `dvc repro` with MLFLOW_TRACKING_URI
    pointing at a real server: one FINISHED run per stage with its params and tags;
    training stages and evaluate also metrics (per step for training) and artifacts."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=tiny_repo.mlflow.uri)
    by_stage = _runs_by_stage(tiny_repo.mlflow)
    spec = yaml.safe_load((tiny_repo.path / "dvc.yaml").read_text())["stages"]
    silent = [s for s in tiny_repo.stages if not by_stage.get(s)]
    assert not silent, (f"stages that made no MLflow run (they must call vlmpipe.ops.tracking.stage_run): {silent}; "
                        f"runs seen for {sorted(k for k in by_stage if k)}")
    for stage in tiny_repo.stages:
        runs = [r for r in by_stage[stage] if "dvc_experiment" not in r.data.tags]
        assert len(runs) == 1, f"{stage}: {len(runs)} runs for one `dvc repro`"
        r = runs[0]
        assert r.info.status == "FINISHED", stage
        assert r.data.params, f"{stage}: no params logged"
        assert r.data.tags["git_commit"] == tiny_repo.commit, stage
        if spec[stage].get("metrics"):
            assert r.data.metrics, f"{stage}: no metrics logged"
            assert c.list_artifacts(r.info.run_id), f"{stage}: no artifacts logged"
        if any("train_curve" in str(p) for p in spec[stage].get("plots", []) or []):
            steps = {m.step for k in r.data.metrics for m in c.get_metric_history(r.info.run_id, k)}
            assert len(steps) > 1, f"{stage}: metrics not logged per step"
        # DVC wrote dvc.lock between the stages: the code was still the commit's.
        assert r.data.tags["git_dirty"] == "false", stage
        model = MODEL_OF.get(stage)
        if model:
            assert all(k.startswith(model + "/") for k in r.data.metrics), (stage, sorted(r.data.metrics))
    # One parent run for the one `dvc repro`, ended with its last stage.
    parents = {r.data.tags.get("mlflow.parentRunId") for s in tiny_repo.stages for r in by_stage[s]
               if "dvc_experiment" not in r.data.tags}
    assert len(parents) == 1 and None not in parents, parents
    parent = c.get_run(parents.pop())
    assert parent.info.run_name == "dvc repro" and parent.info.status == "FINISHED"
    assert parent.data.tags["git_commit"] == tiny_repo.commit


def test_no_secret_in_mlflow_server_store(tiny_repo):
    """The tiny DAG ran with fake AWS keys and tokens in its environment: none of them is in the
    server's database, its artifacts or its log."""
    srv = tiny_repo.mlflow
    files = [srv.db, srv.log, *(f for f in srv.artifacts.rglob("*") if f.is_file())]
    _assert_no_secrets(files, extra_text={"dvc repro output": tiny_repo.repro_output})


def test_stage_completes_quickly_with_dead_tracking_server(tiny_repo, tmp_path):
    """A real stage, pointed at a port nothing listens on: it completes, writes its outputs,
    and says so in one warning."""
    assert DEAD_SERVER_STAGE in tiny_repo.stages, f"{DEAD_SERVER_STAGE} did not run in tiny_repo"
    repo = tiny_repo.clone(tmp_path / "repo")
    env = tiny_repo.env(repo, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{servers.dead_port()}")
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][DEAD_SERVER_STAGE]
    outs = [o if isinstance(o, str) else next(iter(o)) for o in spec.get("outs", [])]
    for o in outs:
        shutil.rmtree(repo / o) if (repo / o).is_dir() else (repo / o).unlink()
    t0 = time.monotonic()
    p = servers.run(["dvc", "repro", "--force", "--single-item", DEAD_SERVER_STAGE], cwd=repo, env=env)
    elapsed = time.monotonic() - t0
    for o in outs:
        assert (repo / o).exists(), f"{o} not written"
    text = p.stdout + p.stderr
    hits = [ln for ln in text.splitlines() if "MLflow" in ln and "WARNING" in ln]
    assert len(hits) == 1 and "unreachable" in hits[0], text[-3000:]
    # The stage itself took about this long in the session's build; allow the
    # probe (instant for a refused port) and DVC's own overhead, not minutes of retries.
    assert elapsed < tiny_repo.build_s + 60, f"{elapsed:.0f}s"
