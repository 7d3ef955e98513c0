"""dvc.yaml lists, for every stage, exactly the project's Python files the stage imports.

DVC reruns a stage when one of its deps changes. A module the stage imports but does not list
means a change there (a default, a bug fix) is never seen; a listed module it does not import
means editing it (say, the CLI) retrains models for nothing. The closure is computed from the
sources: every ``import``/``from ... import`` of ``vlmpipe`` anywhere in a file (function-level
ones too), followed through the files they name, package ``__init__.py`` files included (they run
on import; ``vlmpipe/__init__.py`` pins the CPU kernels, which changes every trained number).
A notebook a stage script names (a string ending in ``.ipynb``) runs as part of the stage: it is a
dep, and so is every module its code cells import.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _module_files(name: str) -> set[Path]:
    """The files that importing ``name`` runs: the module and every package ``__init__`` above it."""
    parts = name.split(".")
    out = {ROOT.joinpath(*parts[:i], "__init__.py") for i in range(1, len(parts) + 1)}
    out.add(ROOT.joinpath(*parts).with_suffix(".py"))
    return {f for f in out if f.is_file()}


def _source(f: Path) -> str:
    """Python source of ``f``; of a notebook, its code cells (they must be plain Python, no magics)."""
    if f.suffix == ".ipynb":
        cells = json.loads(f.read_text())["cells"]
        return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return f.read_text()


def _imports(py: Path) -> set[Path]:
    out: set[Path] = set()
    for node in ast.walk(ast.parse(_source(py), str(py))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".ipynb"):
            out.add(ROOT / node.value)  # a notebook the stage executes
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == "vlmpipe" or name.startswith("vlmpipe."):
                out |= _module_files(name)
    return out


def closure(*scripts: Path) -> set[str]:
    seen: set[Path] = set()
    todo = list(scripts)
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo += sorted(_imports(f) - seen)
    return {str(f.relative_to(ROOT)) for f in seen}


def cmd_closure(cmd: str) -> set[str]:
    """What a stage's command runs: its script, and the launcher when it goes through one."""
    roots = [ROOT / cmd.split()[-1]]
    if "-m vlmpipe.launch" in cmd:
        roots += sorted(_module_files("vlmpipe.launch"))
    return closure(*roots)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_deps_are_exactly_the_import_closure(stage):
    spec = STAGES[stage]
    want = cmd_closure(spec["cmd"])
    listed = {d for d in spec["deps"] if d.endswith((".py", ".ipynb"))}
    assert not want - listed, f"{stage}: imports but does not list {sorted(want - listed)}"
    assert not listed - want, f"{stage}: lists but does not import {sorted(listed - want)}"


def test_closures_stay_tight():
    """A data stage reaches no model, training or evaluation code; evaluate no training loop;
    the command line reaches no stage."""
    for stage in ("download_coco", "build_cifar_qa_csv"):
        deps = closure(ROOT / STAGES[stage]["cmd"].split()[-1])
        assert not [d for d in deps if "/models/" in d or d.endswith(("train.py", "heldout.py", "evaluation.py"))], deps
    assert "vlmpipe/train.py" not in closure(ROOT / "stages/evaluate.py")
    assert not [d for d in closure(ROOT / "stages/evaluate.py") if "pipeline/train_" in d or "tiny" in d]
    # A training stage reaches its own model, not the others'.
    assert "vlmpipe/models/qa_model.py" not in closure(ROOT / "stages/train_gpt2_captioner.py")
    assert "vlmpipe/models/captioner.py" not in closure(ROOT / "stages/train_phi2_qlora.py")
    # The exploration notebook reads data only: editing a model or a training loop never reruns it.
    explore = closure(ROOT / "stages/explore_data.py")
    assert "notebooks/01_data_exploration.ipynb" in explore, explore
    assert not [d for d in explore if "/models/" in d or "/pipeline/" in d or d.endswith(("train.py", "heldout.py"))], explore
    for stage, spec in STAGES.items():
        assert "vlmpipe/cli.py" not in spec["deps"] and "vlmpipe/__main__.py" not in spec["deps"], stage


def test_models_import_no_training_loop_dataloader_or_argparse():
    for f in sorted((ROOT / "vlmpipe/models").glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        banned = {n for n in names if n in ("vlmpipe.train", "argparse", "torch.utils.data.DataLoader")
                  or n.startswith(("vlmpipe.pipeline", "vlmpipe.train."))}
        assert not banned, f"{f.name} imports {sorted(banned)}"
        assert "DataLoader(" not in f.read_text(), f.name


GPU_STAGES = ("train_siglip", "precompute_embeddings", "train_phi2_qlora", "train_gpt2_captioner", "train_gpt2_chat")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_gpu_stages_run_through_the_launcher_and_record_its_counts(stage):
    """`dvc exp run -S launch.nproc_per_node=4` must reach the GPU stages and rerun them (dvc.lock records
    the counts); the data stages and evaluate run one process and must not rerun when the count changes."""
    spec = STAGES[stage]
    launched = spec["cmd"].startswith("python -m vlmpipe.launch stages/")
    counts = {"launch.nproc_per_node", "launch.nnodes"} <= set(spec.get("params", []))
    assert launched == counts == (stage in GPU_STAGES), (stage, spec["cmd"], spec.get("params"))
