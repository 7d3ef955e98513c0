"""`dvc exp run -S lr=1e-4` on the tiny preset: it completes, reruns only what reads lr, `dvc exp show` /
`make exp` / `dvc params diff` / `dvc metrics diff` / `dvc plots diff` show the change, and the MLflow
runs of the stages it re-ran carry the experiment's name.

One experiment per session, run on a copy of the session's `tiny_repo` (the DAG is built once); it also
cuts the QA model's training to one epoch, for suite time (the phi2 keys, like lr, are read by
train_phi2_qlora alone). The runs go to the session's MLflow server, where the tiny DAG registered its
models: the experiment's QA model is scored against the DAG's (champion or candidate). The default
store (mlflow.db in the repository, also from a temporary experiment workspace) is tested in
test_tracking.py, test_registry.py and by the queued experiment of test_data_stages_dvc.py. (The DAG
under two processes is rehearsed with the full preset, test_full_preset.py.)

Until the whole DAG exists (conftest TINY_DAG_STAGES is a list), the experiment changes a param of the
data stages instead, because `lr` is read only by train_phi2_qlora; the tests that need the whole DAG say so.
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
# Shortened QA training (suite time). No QA-base key: its warm-up must not rerun.
WITH = ["phi2.train.epochs=1", "phi2.eval_questions=20"]


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
    env = tiny_repo.env(repo, MLFLOW_TRACKING_URI=tiny_repo.mlflow.uri)
    key, typed, value = FULL_DAG_SET if tiny_repo.full_dag else PARTIAL_DAG_SET
    import yaml

    old = _get(yaml.safe_load((repo / "params.yaml").read_text()), key)
    assert old != value
    more = [x for kv in WITH for x in ("-S", kv)] if tiny_repo.full_dag else []
    p = servers.run(["dvc", "exp", "run", "-S", f"{key}={typed}", *more, *tiny_repo.targets], cwd=repo, env=env,
                    timeout=1500)
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
    uri = tiny_repo.mlflow.uri
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = c.get_experiment_by_name("vlmpipe")
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.dvc_experiment = '{ex.name}'")
    stage_runs = [r for r in runs if "stage" in r.data.tags]
    logged = sorted(r.data.tags["stage"] for r in stage_runs)
    assert logged == sorted(ex.reran), (f"MLflow runs tagged dvc_experiment={ex.name}: {logged}; "
                                        f"stages the experiment ran: {ex.reran}")
    for r in stage_runs:
        assert r.info.status == "FINISHED"
        assert r.info.run_name == f"{r.data.tags['stage']}@{ex.name}"
    # The experiment's stages sit under one parent run named after it.
    (parent,) = {r.data.tags.get("mlflow.parentRunId") for r in stage_runs}
    assert c.get_run(parent).info.run_name == ex.name and c.get_run(parent).info.status == "FINISHED"
    if tiny_repo.full_dag:
        # Its QA model was scored against the tiny DAG's: champion only if it beat it.
        versions = c.search_model_versions("name = 'vlmpipe-qa'")
        (mine,) = [v for v in versions if v.tags.get("dvc_experiment") == ex.name]
        (dag,) = [v for v in versions if v.tags.get("git_commit") == tiny_repo.commit
                  and "dvc_experiment" not in v.tags]
        better = float(mine.tags["eval.accuracy"]) > float(dag.tags["eval.accuracy"])
        aliases = {a: str(v) for a, v in c.get_registered_model("vlmpipe-qa").aliases.items()}
        want = {"champion": str(mine.version)} if better else {"champion": str(dag.version),
                                                               "candidate": str(mine.version)}
        assert aliases == want, (aliases, mine.tags, dag.tags)
    if tiny_repo.full_dag:
        (phi2,) = [r for r in stage_runs if r.data.tags["stage"] == "train_phi2_qlora"]
        lrs = {k: float(v) for k, v in phi2.data.params.items() if k == "lr" or k.endswith(".lr")}
        assert lrs and all(v == pytest.approx(1e-4) for v in lrs.values()), \
            f"train_phi2_qlora's MLflow params do not show lr=1e-4: {lrs}"


def _downstream(repo: Path, stage: str) -> set[str]:
    """The stages below ``stage`` in dvc.yaml's DAG: those that read an output of it, or of one of them."""
    import yaml

    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    outs = {name: [o if isinstance(o, str) else next(iter(o)) for o in s.get("outs", [])] for name, s in stages.items()}
    below, todo = set(), [stage]
    while todo:
        made = outs[todo.pop()]
        for name, s in stages.items():
            if name not in below and any(d == o or d.startswith(o + "/") or o.startswith(d + "/")
                                         for d in s.get("deps", []) for o in made):
                below.add(name)
                todo.append(name)
    return below


def _status_after(repo: Path, env: dict, edit) -> dict:
    """`dvc status --json` with params.yaml edited by ``edit(dict)``; params.yaml restored after."""
    import yaml

    params = repo / "params.yaml"
    before = params.read_text()
    data = yaml.safe_load(before)
    edit(data)
    try:
        params.write_text(yaml.safe_dump(data, sort_keys=False))
        return json.loads(servers.run(["dvc", "status", "--json"], cwd=repo, env=env).stdout)
    finally:
        params.write_text(before)


def test_exp_run_reruns_only_the_stages_that_read_the_changed_params(experiment, tiny_repo):
    """lr reruns train_phi2_qlora, its evaluation and the report, not the QA base's warm-up nor the other
    models' evaluations; a chat param is read by train_gpt2_chat alone (its evaluation then reruns because
    models/chat changed): `dvc status` after the edit names that one stage."""
    if not tiny_repo.full_dag:
        pytest.skip("needs the whole tiny DAG")
    assert sorted(experiment.reran) == ["evaluate_qa", "report", "train_phi2_qlora"], experiment.reran
    assert _downstream(experiment.repo, "train_phi2_qlora") == {"evaluate_qa", "report"}
    status = _status_after(experiment.repo, experiment.env, lambda d: d["chat"]["train"].update(lr=5e-4))
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


def test_metrics_diff_shows_changed_quality_only(experiment, tiny_repo):
    """`dvc metrics diff` is the quality file alone, namespaced per model: the changed scores, no
    throughput, MFU or seconds (those are in reports/speed/, untracked, and in MLflow)."""
    if not tiny_repo.full_dag:
        pytest.skip("needs the whole tiny DAG (lr is read by train_phi2_qlora, metrics by evaluate_qa): "
                    "set TINY_DAG_STAGES = None in tests/conftest.py once every stage exists")
    ex = experiment
    diff = json.loads(servers.run(["dvc", "metrics", "diff", "--json"], cwd=ex.repo, env=ex.env).stdout)
    assert list(diff) == ["reports/metrics.json"], list(diff)
    keys = list(diff["reports/metrics.json"])
    assert any(k.startswith("vqa.") for k in keys), keys
    assert {k.split(".")[0] for k in keys} <= {"siglip", "vqa", "captioner", "chat"}, keys
    assert not [k for k in keys if "per_s" in k or "seconds" in k or "mfu" in k], keys
    speed = json.loads((ex.repo / "reports/speed/phi2_vlm.json").read_text())
    assert "tokens_per_s" in speed
    # The experiment's metrics are also reachable by name, as `dvc exp show` lists them.
    shown = json.loads(servers.run(["dvc", "exp", "show", "--json"], cwd=ex.repo, env=ex.env).stdout)
    revs = [rev for r in shown if r["rev"] != "workspace" for g in r["experiments"] or [] for rev in g["revs"]]
    (exp_rev,) = [rev for rev in revs if rev["name"] == ex.name]
    assert "reports/metrics.json" in exp_rev["data"]["metrics"]


def test_make_exp_shows_the_change_and_the_headlines_in_few_columns(experiment, tiny_repo):
    """`make exp` (the README's view of the experiments): the params the experiment changed and each
    model's headline score, at most 20 columns; plain `dvc exp show` has every param, dep and score."""
    if not tiny_repo.full_dag:
        pytest.skip("needs the whole tiny DAG")
    import csv
    import io
    import subprocess

    from conftest import REPO_ROOT

    ex = experiment
    dry = subprocess.run(["make", "-n", "-s", "exp"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    (cmd,) = [line for line in dry.stdout.splitlines() if line.startswith("dvc exp show")]
    out = servers.run(["bash", "-c", cmd + " --csv"], cwd=ex.repo, env=ex.env).stdout
    header = next(csv.reader(io.StringIO(out)))
    assert len(header) <= 20, header
    assert {"siglip.i2t_r1", "vqa.accuracy", "captioner.cider", "chat.exact_match", "lr",
            "phi2.train.epochs"} <= set(header), header
    assert not [h for h in header if "/" in h or "by_type" in h], header  # no deps, no breakdowns
    everything = next(csv.reader(io.StringIO(servers.run(["dvc", "exp", "show", "--csv"], cwd=ex.repo,
                                                         env=ex.env).stdout)))
    print(f"\ndvc exp show: {len(everything)} columns; make exp: {len(header)}: {header}")
    assert len(everything) > 3 * len(header)


def test_plots_draw_offline_in_a_browser(experiment, tiny_repo, tmp_path):
    """`dvc plots diff` of the experiment against its baseline (and `dvc plots show`): the page carries
    vega itself (.dvc/config names plots/offline.html), so every chart draws in a headless Chromium
    that reaches no network; no chart is untitled and none is a stage-level duplicate."""
    if not tiny_repo.full_dag:
        pytest.skip("needs the whole tiny DAG")
    import os
    import time

    import browser
    import yaml

    if browser.missing():
        if os.environ.get("VLMPIPE_REQUIRE_BROWSER") == "1":
            pytest.fail(browser.missing())
        pytest.skip(browser.missing())
    ex = experiment
    titled = yaml.safe_load((ex.repo / "dvc.yaml").read_text())["plots"]
    assert all(next(iter(p.values())).get("title") for p in titled)
    for name, args in (("show", ["show"]), ("diff", ["diff"])):  # diff: the experiment against its baseline
        out = tmp_path / name
        servers.run(["dvc", "plots", *args, "-o", str(out)], cwd=ex.repo, env=ex.env)
        page = (out / "index.html").read_text()
        assert "cdn.jsdelivr" not in page and "<script src=" not in page
        with browser.chrome() as driver:
            driver.get((out / "index.html").as_uri())
            deadline = time.monotonic() + 60
            while True:
                state = driver.execute_script(
                    "return [...document.querySelectorAll('body > div[id]')]"
                    ".map(d => [d.id, !!d.querySelector('canvas, svg.marks')])")
                # The page adds its charts one by one: done when every plot has one, drawn.
                if (len(state) == len(titled) and all(drawn for _, drawn in state)) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        assert len(state) == len(titled), state
        assert all(drawn for _, drawn in state), f"dvc plots {name}: charts left blank: {state}"
