"""The two data stages as the user runs them: the CLI, and `dvc repro` in a copy of the repo."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = {
    "coco": {"synthetic_train_images": 24, "synthetic_val_images": 8},
    "cifar": {"synthetic_train_per_class": 3, "synthetic_test_per_class": 2},
}


def _env(repo: Path) -> dict[str, str]:
    env = dict(os.environ)
    # The stage scripts call `python`; the copy's own vlmpipe must win over
    # the editable install of the working tree.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(repo)
    env["DVC_NO_ANALYTICS"] = "1"
    env.pop("VLMPIPE_PARAMS", None)
    return env


def _copy_repo(dest: Path, overrides: dict) -> Path:
    for rel in ("stages", "vlmpipe", "inputs"):
        shutil.copytree(ROOT / rel, dest / rel, ignore=shutil.ignore_patterns("__pycache__"))
    for rel in ("dvc.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore", "requirements.txt"):
        if (ROOT / rel).exists():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def _run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=timeout)


def test_bad_csv_through_the_stage_is_one_line_without_traceback(tmp_path):
    from vlmpipe.sources import cifar
    from vlmpipe.sources import shapes

    repo = _copy_repo(tmp_path / "repo", {**SMALL, "qa": {"csv_path": "inputs/data/user_qa.csv"}})
    _, labels, _ = cifar.synthetic_split(0, "train", 3)  # what the stage will generate
    header = "Dataset_Index,Class_Label,Split,Q1,Q2,Q3,Q4,Q5,A1,A2,A3,A4,A5\n"
    good = "".join(f"{i},{shapes.SHAPES[labels[i]]},train,q1?,q2?,q3?,q4?,q5?,a,b,c,d,e\n" for i in (0, 1))
    (repo / "inputs/data/user_qa.csv").write_text(header + good)
    assert _run([sys.executable, "stages/build_cifar_qa_csv.py"], repo).returncode == 0
    before = {p: p.read_bytes() for p in (repo / "data").rglob("*") if p.is_file()}
    (repo / "inputs/data/user_qa.csv").write_text(header + good + "x,circle,train,q1?,q2?,q3?,q4?,q5?,a,b,c,d,e\n")
    # Other CIFAR batches this time: the refusal must leave the earlier ones, not new batches beside the
    # old CSV.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["cifar"]["synthetic_test_per_class"] += 1  # the train images the CSV names stay as they are
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = _run([sys.executable, "stages/build_cifar_qa_csv.py"], repo)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: inputs/data/user_qa.csv: data row 3 (line 4), column Dataset_Index: 'x' is not a non-negative integer"], r.stderr
    # The earlier outputs are as they were, byte for byte, and nothing else was left in data/.
    assert {p: p.read_bytes() for p in (repo / "data").rglob("*") if p.is_file()} == before


@pytest.mark.slow  # `dvc repro` of the data stages, three times
@pytest.mark.skipif(not (BIN / "dvc").exists(), reason="dvc is not installed in this environment")
def test_data_stages_through_dvc_on_a_user_csv_then_nothing_to_do_then_its_edit_reruns(tmp_path):
    """`dvc repro` of the two data stages with a user's CSV in its own columns, about train images only:
    written in the columns every later stage reads, with the split, the default question type and one
    of its two images held out. A second repro has nothing to do. An edit of the CSV (qa.csv_path, a DVC
    dependency under inputs/data) reruns its stage: it used to be ignored ('didn't change, skipping'),
    and training kept the stale copy."""
    from vlmpipe.sources import cifar
    from vlmpipe.sources import shapes

    repo = _copy_repo(tmp_path / "repo", {**SMALL, "qa": {"csv_path": "inputs/data/user_qa.csv"}})
    _, labels, _ = cifar.synthetic_split(0, "train", 3)  # what the stage will generate
    names = [shapes.SHAPES[labels[i]] for i in (0, 1)]
    csv_file = repo / "inputs/data/user_qa.csv"
    csv_file.write_text("Dataset_Index,Class_Label,Q1,Q2,Q3,Q4,Q5,A1,A2,A3,A4,A5\n" + "".join(
        f"{i},{n},what is it?,,,,,{n},,,,\n" for i, n in enumerate(names)))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    setup = [["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-q", "-m", "copy"]]
    if not (repo / ".dvc").exists():
        setup.insert(1, [str(BIN / "dvc"), "init", "-q"])
    for cmd in setup:
        r = _run(cmd, repo)
        assert r.returncode == 0, r.stderr
    dvc = [str(BIN / "dvc"), "repro", "download_coco", "build_cifar_qa_csv"]
    r = _run(dvc, repo)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (repo / "data/coco/train2017.zip").exists() and (repo / "data/coco/annotations/captions_val2017.json").exists()
    assert (repo / "data/cifar/cifar-10-batches-py/test_batch").exists() and (repo / "dvc.lock").exists()
    lines = (repo / "data/cifar_qa.csv").read_text().splitlines()
    assert lines[0] == ("Dataset_Index,Class_Label,Split,Q1,Q2,Q3,Q4,Q5,A1,A2,A3,A4,A5,T1,T2,T3,T4,T5,Heldout")
    assert [x.rsplit(",", 1)[0] for x in lines[1:]] == [f"{i},{n},train,what is it?,,,,,{n},,,,,unknown,,,,"
                                                         for i, n in enumerate(names)]
    assert sorted(x.rsplit(",", 1)[1] for x in lines[1:]) == ["no", "yes"]

    again = _run(dvc, repo)
    assert again.returncode == 0, again.stdout + again.stderr
    out = again.stdout + again.stderr
    assert "Data and pipelines are up to date" in out or out.count("didn't change") == 2, out
    assert "Running stage" not in out

    csv_file.write_text(csv_file.read_text().replace("what is it?", "what shape is this?"))
    r = _run(dvc, repo)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "Running stage 'build_cifar_qa_csv'" in out, out
    assert "what shape is this?" in (repo / "data/cifar_qa.csv").read_text()


def test_a_user_csv_outside_inputs_is_refused_in_one_line(tmp_path):
    repo = _copy_repo(tmp_path / "repo", {**SMALL, "qa": {"csv_path": "user_qa.csv"}})
    (repo / "user_qa.csv").write_text("Dataset_Index\n")
    r = _run([sys.executable, "stages/build_cifar_qa_csv.py"], repo)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [x for x in r.stderr.splitlines() if x.startswith("error:")] == [
        "error: params.yaml: qa.csv_path: 'user_qa.csv' is outside inputs/data/: put it (or a link to it) there, "
        "so that DVC reruns what it feeds when it changes"]


@pytest.mark.slow  # a queued experiment, run by DVC's queue worker
@pytest.mark.skipif(not (BIN / "dvc").exists(), reason="dvc is not installed in this environment")
def test_a_queued_experiment_runs_the_library_it_was_queued_with(tmp_path):
    """`dvc exp run --queue` snapshots the workspace and runs it later in a copy of the repository. The
    workspace's library may change meanwhile (here it is broken outright); the experiment must run the
    snapshot's own vlmpipe. PYTHONPATH names the workspace, as the editable install does in a user's
    checkout: a stage command that let it win would import the broken package and fail."""
    repo = _copy_repo(tmp_path / "repo", SMALL)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for cmd in (["git", "init", "-q"], ["git", "config", "user.name", "test"],
                ["git", "config", "user.email", "test@example.com"], ["git", "add", "-A"],
                [*git, "commit", "-q", "-m", "copy"]):
        assert _run(cmd, repo).returncode == 0
    dvc = str(BIN / "dvc")
    r = _run([dvc, "exp", "run", "--queue", "-n", "more-cifar", "-S", "cifar.synthetic_train_per_class=4",
              "build_cifar_qa_csv"], repo)
    assert r.returncode == 0, r.stdout + r.stderr
    init = repo / "vlmpipe/__init__.py"
    init.write_text(init.read_text() + '\nraise RuntimeError("the workspace\'s vlmpipe was imported")\n')

    r = _run([dvc, "exp", "run", "--run-all"], repo, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "the workspace's vlmpipe was imported" not in out
    # The experiment ran in its own commit, with its own params; the workspace was left alone.
    refs = [x for x in _run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo).stdout.split()
            if x.endswith("/more-cifar")]
    assert len(refs) == 1, refs
    params = yaml.safe_load(_run(["git", "show", f"{refs[0]}:params.yaml"], repo).stdout)
    assert params["cifar"]["synthetic_train_per_class"] == 4
    lock = yaml.safe_load(_run(["git", "show", f"{refs[0]}:dvc.lock"], repo).stdout)["stages"]
    assert lock["build_cifar_qa_csv"]["params"]["params.yaml"]["cifar"]["synthetic_train_per_class"] == 4
    assert lock["build_cifar_qa_csv"]["outs"]
    assert not (repo / "data").exists()
