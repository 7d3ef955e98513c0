"""dvc.yaml lists, for every stage, the folders of the project's Python files the stage imports.

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


# Output-neutral code: it writes no DVC output, so no stage lists it and the closure does not follow it.
# vlmpipe/ops (tracking, registration, preflight) is entered only through vlmpipe/core/stage.py;
# vlmpipe/face (CLI, demo, pyfunc) is reached by no stage at all.
OPS, FACE = "vlmpipe/ops/", "vlmpipe/face/"
CODE = ("vlmpipe/", "stages/", "notebooks/", "requirements.txt")


def closure(*scripts: Path) -> set[str]:
    """The project files running ``scripts`` imports, not following into the output-neutral ``vlmpipe/ops``."""
    seen: set[Path] = set()
    todo = list(scripts)
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        if not str(f.relative_to(ROOT)).startswith(OPS):
            todo += sorted(_imports(f) - seen)
    return {str(f.relative_to(ROOT)) for f in seen if not str(f.relative_to(ROOT)).startswith(OPS)}


def cmd_closure(cmd: str) -> set[str]:
    """What a stage's command runs: its script, and the launcher when it goes through one."""
    last = cmd.split()[-1]  # `python -m stages.NAME`, or the launcher's `stages/NAME.py`
    roots = [ROOT / (last if last.endswith(".py") else last.replace(".", "/") + ".py")]
    if "-m vlmpipe.loop.launch" in cmd:
        roots += sorted(_module_files("vlmpipe.loop.launch"))
    return closure(*roots)


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def code_deps(stage: str) -> list[str]:
    return [d for d in STAGES[stage]["deps"] if d.startswith(CODE)]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_deps_cover_the_import_closure_by_folder(stage):
    """Every file the stage imports lies in a listed folder or file (an empty package ``__init__.py``
    excepted: it runs nothing); every listed code entry is imported; nothing output-neutral is listed."""
    deps = code_deps(stage)
    want = cmd_closure(STAGES[stage]["cmd"])
    missing = sorted(f for f in want if not _covered(f, deps)
                     and not (f.endswith("__init__.py") and not (ROOT / f).read_text().strip()))
    assert not missing, f"{stage}: imports but does not list {missing}"
    unused = [d for d in deps if d != "requirements.txt" and not any(_covered(f, [d]) for f in want)]
    assert not unused, f"{stage}: lists but does not import {unused}"
    assert "requirements.txt" in deps, f"{stage}: the pinned requirements decide its numbers"
    assert not [d for d in deps if d.startswith((OPS, FACE))], f"{stage}: lists output-neutral code {deps}"
    assert not [f for f in want if f.startswith(FACE)], f"{stage}: reaches the inference face"


def test_only_the_stage_context_enters_ops():
    """Hashed code reaches tracking, registration and the preflight through core/stage.py, and the launcher
    reaches the params check of every section (it decides nothing with them), so nothing ops does can feed
    a DVC output unseen."""
    doors = set()
    for f in sorted((ROOT / "vlmpipe").rglob("*.py")) + sorted((ROOT / "stages").glob("*.py")):
        rel = str(f.relative_to(ROOT))
        if rel.startswith((OPS, FACE)) or rel == "vlmpipe/__main__.py":
            continue
        if any(str(g.relative_to(ROOT)).startswith(OPS) for g in _imports(f)):
            doors.add(rel)
    assert doors == {"vlmpipe/core/stage.py", "vlmpipe/loop/launch.py"}, doors


def test_no_private_name_is_used_across_modules():
    """Neither ``from vlmpipe.x import _name`` nor ``module._name`` on an imported vlmpipe module."""
    bad = []
    for f in sorted((ROOT / "vlmpipe").rglob("*.py")) + sorted((ROOT / "stages").glob("*.py")):
        tree = ast.parse(f.read_text())
        modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vlmpipe"):
                bad += [f"{f.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_")]
                modules |= {a.asname or a.name for a in node.names}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{f.relative_to(ROOT)}: {node.value.id}.{node.attr}")
    assert not bad, bad


def test_closures_stay_tight():
    """A data stage reaches no model, training or scoring code; an evaluation no training loop; a
    training or evaluation stage not the other models' wings; the report and the exploration notebook
    no model code."""
    for stage in ("download_coco", "build_cifar_qa_csv", "build_conversations"):
        deps = cmd_closure(STAGES[stage]["cmd"])
        assert not [d for d in deps if d.startswith(("vlmpipe/models/", "vlmpipe/loop/", "vlmpipe/scoring/"))], deps
    wings = ("siglip", "qa", "captioner", "chat")
    for wing in wings:  # an evaluation reaches no training loop and no other model's wing
        deps = cmd_closure(STAGES[f"evaluate_{wing}"]["cmd"])
        assert not [d for d in deps if d.startswith("vlmpipe/loop/")
                    or d.split("/")[1] in wings and d.split("/")[1] != wing], (wing, deps)
    report = cmd_closure(STAGES["report"]["cmd"])
    assert not [d for d in report if d.startswith(("vlmpipe/models/", "vlmpipe/loop/"))], report
    wings = ("siglip", "qa", "captioner", "chat")
    for stage, wing in (("train_siglip", "siglip"), ("train_phi2_qlora", "qa"), ("train_gpt2_captioner", "captioner"),
                        ("train_gpt2_chat", "chat")):
        deps = cmd_closure(STAGES[stage]["cmd"])
        assert not [d for d in deps if d.split("/")[1] in wings and d.split("/")[1] != wing], (stage, deps)
    assert "vlmpipe/models/qa_model.py" not in cmd_closure(STAGES["train_gpt2_captioner"]["cmd"])
    assert "vlmpipe/models/captioner.py" not in cmd_closure(STAGES["train_phi2_qlora"]["cmd"])
    explore = cmd_closure(STAGES["explore_data"]["cmd"])
    assert "notebooks/01_data_exploration.ipynb" in explore, explore
    assert not [d for d in explore if d.startswith(("vlmpipe/models/", "vlmpipe/loop/"))], explore


def test_models_import_no_training_loop_data_dataloader_or_argparse():
    """Models own their templates and their collate; datasets and readers build on them, not the reverse."""
    for f in sorted((ROOT / "vlmpipe/models").glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        banned = {n for n in names if n in ("argparse", "torch.utils.data.DataLoader")
                  or n.startswith(("vlmpipe.loop", "vlmpipe.ops", "vlmpipe.face", "vlmpipe.data"))}
        assert not banned, f"{f.name} imports {sorted(banned)}"
        assert "DataLoader(" not in f.read_text(), f.name


GPU_STAGES = ("train_siglip", "precompute_embeddings", "train_phi2_qlora", "train_gpt2_captioner", "train_gpt2_chat")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_gpu_stages_run_through_the_launcher_and_record_its_counts(stage):
    """`dvc exp run -S launch.nproc_per_node=4` must reach the GPU stages and rerun them (dvc.lock records
    the counts); the data stages and evaluate run one process and must not rerun when the count changes."""
    spec = STAGES[stage]
    launched = spec["cmd"].startswith("python -m vlmpipe.loop.launch stages/")
    counts = {"launch.nproc_per_node", "launch.nnodes"} <= set(spec.get("params", []))
    assert launched == counts == (stage in GPU_STAGES), (stage, spec["cmd"], spec.get("params"))
    # `python -m` from the repository root: a queued or --temp experiment's copy imports its own vlmpipe
    # (tests/test_data_stages_dvc.py runs one against a broken workspace library).
    assert spec["cmd"] == (f"python -m vlmpipe.loop.launch stages/{stage}.py" if launched
                           else f"python -m stages.{stage}"), spec["cmd"]


def test_the_kubernetes_recipe_names_every_launched_stage():
    """deploy/kubernetes/node.sh runs the launched stages on every pod, in DAG order; it refuses to start
    when its list and dvc.yaml disagree, so a stage added to dvc.yaml must be added there too."""
    import re

    text = (ROOT / "deploy/kubernetes/node.sh").read_text()
    (listed,) = re.findall(r'^STAGES="([^"]*)"', text, re.M)
    assert listed.split() == [s for s, spec in STAGES.items() if "-m vlmpipe.loop.launch" in spec["cmd"]]
