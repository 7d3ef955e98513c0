"""`dvc exp run -S lr=1e-4` on the tiny preset: it completes, `dvc exp show` /
`dvc params diff` / `dvc metrics diff` show the change, and the MLflow runs of the
stages it re-ran carry the experiment's name.

One experiment per session, run on a copy of the session's `tiny_repo` (the DAG
is built once; the experiment also cuts the QA model's training to one epoch, for suite time; the experiment re-runs only what depends on the changed param:
train_phi2_qlora, evaluate_qa and report for `lr`; a `chat` param is read by train_gpt2_chat alone). The runs go to the default store,
mlflow.db in the repository root, as for a user who set no MLFLOW_TRACKING_URI.

Until the whole DAG exists (conftest TINY_DAG_STAGES is a list), the
experiment changes a param of the data stages instead, because `lr` is read
only by train_phi2_qlora; the metrics test needs the whole DAG and says so.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import servers

# The param the experiment changes: (key, new value as typed on the command line, as YAML loads it).
FULL_DAG_SET = ("lr", "1e-4", 1e-4)                              # the command
PARTIAL_DAG_SET = ("cifar.synthetic_test_per_class", "21", 21)   # read by build_cifar_qa_csv
SHORT_PHI = ["phi2.train.epochs=1", "phi2.eval_questions=20"]


@dataclass
class Experiment:
    repo: Path
    env: dict
    name: str
    key: str
    value: object
    old_value: object
    reran: list[str]
    output: str


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


@pytest.fixture(scope="module")
def experiment(tiny_repo, tmp_path_factory) -> Experiment:
    repo = tiny_repo.clone(tmp_path_factory.mktemp("experiment") / "repo")
    env = tiny_repo.env(repo)  # no MLFLOW_TRACKING_URI: the default store in the repo
    key, typed, value = FULL_DAG_SET if tiny_repo.full_dag else PARTIAL_DAG_SET
    import yaml

    old = _get(yaml.safe_load((repo / "params.yaml").read_text()), key)
    assert old != value
    # Shortened training (suite time): the phi2 keys, like lr, are read by train_phi2_qlora alone.
    short = [x for kv in SHORT_PHI for x in ("-S", kv)] if tiny_repo.full_dag else []
    p = servers.run(["dvc", "exp", "run", "-S", f"{key}={typed}", *short, *tiny_repo.targets], cwd=repo, env=env,
                    timeout=900)
    out = p.stdout + p.stderr
    reran = re.findall(r"Running stage '([^']+)'", out)
    assert reran, f"the experiment re-ran no stage:\n{out[-3000:]}"
    names = servers.run(["dvc", "exp", "ls", "--name-only"], cwd=repo, env=env).stdout.split()
    assert len(names) == 1, names
    return Experiment(repo, env, names[0], key, value, old, reran, out)


def test_exp_run_completes_and_mlflow_runs_carry_its_name(experiment, tiny_repo):
    from mlflow.tracking import MlflowClient

    ex = experiment
    assert f"Ran experiment(s): {ex.name}" in ex.output or ex.name in ex.output
    db = ex.repo / "mlflow.db"
    assert db.exists(), f"the stages re-run by the experiment ({ex.reran}) logged nothing to {db}"
    c = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = c.get_experiment_by_name("vlmpipe")
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.dvc_experiment = '{ex.name}'")
    logged = sorted(r.data.tags["stage"] for r in runs)
    assert logged == sorted(ex.reran), (f"MLflow runs tagged dvc_experiment={ex.name}: {logged}; "
                                        f"stages the experiment ran: {ex.reran}")
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.info.run_name == f"{r.data.tags['stage']}@{ex.name}"
    if tiny_repo.full_dag:
        (phi2,) = [r for r in runs if r.data.tags["stage"] == "train_phi2_qlora"]
        lrs = {k: float(v) for k, v in phi2.data.params.items() if k == "lr" or k.endswith(".lr")}
        assert lrs and all(v == pytest.approx(1e-4) for v in lrs.values()), \
            f"train_phi2_qlora's MLflow params do not show lr=1e-4: {lrs}"


def test_exp_run_reruns_only_the_stages_that_read_the_changed_params(experiment, tiny_repo):
    """lr reruns train_phi2_qlora, its evaluation and the report, not the QA base's warm-up nor the other
    models' evaluations; a chat param is read by train_gpt2_chat alone (its evaluation then reruns because
    models/chat changed): `dvc status` after the edit names that one stage."""
    if not tiny_repo.full_dag:
        pytest.skip("needs the whole tiny DAG")
    assert sorted(experiment.reran) == ["evaluate_qa", "report", "train_phi2_qlora"], experiment.reran
    import yaml

    params = experiment.repo / "params.yaml"
    before = params.read_text()
    data = yaml.safe_load(before)
    data["chat"]["train"]["lr"] = 5e-4
    try:
        params.write_text(yaml.safe_dump(data, sort_keys=False))
        status = json.loads(servers.run(["dvc", "status", "--json"], cwd=experiment.repo, env=experiment.env).stdout)
    finally:
        params.write_text(before)
    assert list(status) == ["train_gpt2_chat"], status


def test_exp_show_and_params_diff_show_the_change(experiment):
    ex = experiment
    shown = json.loads(servers.run(["dvc", "exp", "show", "--json"], cwd=ex.repo, env=ex.env).stdout)
    baseline = next(r for r in shown if r["rev"] != "workspace")
    (exp_rev,) = [rev for group in baseline["experiments"] or [] for rev in group["revs"]
                  if rev["name"] == ex.name]
    assert _get(exp_rev["data"]["params"]["params.yaml"]["data"], ex.key) == pytest.approx(ex.value)
    assert _get(baseline["data"]["params"]["params.yaml"]["data"], ex.key) == pytest.approx(ex.old_value)
    # The table a user sees (wide enough that no column is cut to "…").
    table = servers.run(["dvc", "exp", "show", "--no-pager"], cwd=ex.repo, env={**ex.env, "COLUMNS": "4000"}).stdout
    assert ex.name in table, table
    diff = json.loads(servers.run(["dvc", "params", "diff", "--json"], cwd=ex.repo, env=ex.env).stdout)
    change = diff["params.yaml"][ex.key]
    assert change["old"] == pytest.approx(ex.old_value) and change["new"] == pytest.approx(ex.value)


def test_metrics_diff_shows_changed_metrics(experiment, tiny_repo):
    if not tiny_repo.full_dag:
        pytest.skip("needs the whole tiny DAG (lr is read by train_phi2_qlora, metrics by evaluate): "
                    "set TINY_DAG_STAGES = None in tests/conftest.py once every stage exists")
    ex = experiment
    diff = json.loads(servers.run(["dvc", "metrics", "diff", "--json"], cwd=ex.repo, env=ex.env).stdout)
    phi2 = diff.get("reports/phi2_vlm/metrics.json", {})
    changed = {k: v for k, v in phi2.items() if v.get("old") != v.get("new")}
    assert changed, f"dvc metrics diff shows no change in train_phi2_qlora's metrics: {diff}"
    text = servers.run(["dvc", "metrics", "diff"], cwd=ex.repo, env=ex.env).stdout
    assert "reports/phi2_vlm/metrics.json" in text, text
    # The experiment's metrics are also reachable by name, as `dvc exp show` lists them.
    shown = json.loads(servers.run(["dvc", "exp", "show", "--json"], cwd=ex.repo, env=ex.env).stdout)
    revs = [rev for r in shown if r["rev"] != "workspace" for g in r["experiments"] or [] for rev in g["revs"]]
    (exp_rev,) = [rev for rev in revs if rev["name"] == ex.name]
    assert "reports/phi2_vlm/metrics.json" in exp_rev["data"]["metrics"]


def test_quality_diff_leaves_the_timings_out(experiment, tiny_repo):
    """Speed lives in reports/speed/: a diff of the quality files shows no throughput or MFU, and the
    speed files are there to diff on their own."""
    if not tiny_repo.full_dag:
        pytest.skip("needs the whole tiny DAG")
    ex = experiment
    quality = ["reports/metrics.json", "reports/siglip", "reports/phi2_vlm", "reports/captioner", "reports/chat"]
    diff = json.loads(servers.run(["dvc", "metrics", "diff", "--json", "--targets", *quality], cwd=ex.repo,
                                  env=ex.env).stdout)
    keys = [k for f in diff.values() for k in f]
    assert "reports/phi2_vlm/metrics.json" in diff and keys
    assert not [k for k in keys if "per_s" in k or "seconds" in k or "mfu" in k], keys
    speed = json.loads(servers.run(["dvc", "metrics", "diff", "--json", "--targets", "reports/speed"], cwd=ex.repo,
                                   env=ex.env).stdout)
    assert "tokens_per_s" in speed.get("reports/speed/phi2_vlm.json", {}), speed
