"""The default DAG over several seeds: every headline as mean ± sd, and each stage's time.

Clones this repository (its committed HEAD) into a scratch folder and runs, there, one
``dvc exp run -S seed=N`` per seed — the same command a user runs, every stage from scratch (each
stage reads ``seed``: the data too). After each run it reads ``reports/metrics.json`` and the stages'
"<stage> done in Ns" lines, and keeps each run's ``dvc.lock`` beside the clone. ``--lr`` also times ``dvc exp run -S lr=...`` right after the first seed's
run: the experiment a user tries first, which reruns the QA model and what reads it.

``--stage`` (an evaluation stage, repeatable) runs ``dvc exp run STAGE ...`` instead: those stages and
what they need, no more; the headlines are then read from those evaluations' ``reports/eval/*.json``
(``report`` does not run, so ``reports/metrics.json`` would be the committed seed's).

Usage::

    python benchmarks/seeds.py                         # seeds 0 1 2 of params.yaml as committed
    python benchmarks/seeds.py --set captioner.train.epochs=4 --lr 2e-4 --out seeds.json
    python benchmarks/seeds.py --stage evaluate_chat --set conversations.per_image=1 --set chat.train.epochs=3

Prints a Markdown table (metric, one column per seed, mean ± sd; the sd is the sample standard
deviation over the seeds, n - 1) and writes the figures as JSON with ``--out``. Run it on an idle
machine: the stage times are wall-clock seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import yaml

REPO = Path(__file__).resolve().parents[1]

# (dotted key in reports/metrics.json, what it is); keys a run does not have are left out.
HEADLINES = [
    ("siglip.zero_shot_acc", "SigLIP zero-shot accuracy"),
    ("siglip.i2t_r1", "SigLIP image→text R@1"),
    ("siglip.t2i_r1", "SigLIP text→image R@1"),
    ("vqa.accuracy", "QA exact match (VQA)"),
    ("vqa.by_type.colour", "QA colour questions"),
    ("captioner.cider", "captioner CIDEr"),
    ("captioner.scene_right", "captioner: scenes captioned right"),
    ("chat.exact_match", "chat exact match"),
    ("chat.by_type.followup", "chat follow-ups, with the history"),
    ("chat.followup_no_history", "chat follow-ups, history removed"),
    ("chat.by_type.describe", "chat descriptions"),
]
DONE = re.compile(r"INFO (\w+): \1 done in (\d+)s")


def lookup(metrics: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(metrics, dict) or part not in metrics:
            return None
        metrics = metrics[part]
    return metrics


def scratch(work: Path | None, who: str) -> Path:
    """``work``, or a new temporary folder named after the benchmark ``who`` (--workdir's default)."""
    return work or Path(tempfile.mkdtemp(prefix=f"vlmpipe-{who.replace('_', '-')}-"))


def clone_head(work: Path) -> tuple[Path, str]:
    """A clone of this repository's committed HEAD in ``work``/repo, and that commit."""
    clone = work / "repo"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    return clone, commit


def committed_params(clone: Path) -> None:
    """params.yaml back as committed: `dvc exp run -S` edits it in place and leaves the edit in the
    workspace, so a run after ``--lr``'s would otherwise inherit its learning rate."""
    subprocess.run(["git", "checkout", "--quiet", "HEAD", "--", "params.yaml"], cwd=clone, check=True)


def run(cmd: list[str], cwd: Path, log, who: str = "seeds") -> tuple[str, float]:
    """Run ``cmd`` in ``cwd`` with this interpreter's environment first on PATH; (its output, seconds).
    A failure exits naming the command and the log (``who``: the benchmark that ran it)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(cwd)}
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - t
    log.write(f"$ {' '.join(cmd)}\n{r.stdout}\n")
    if r.returncode:
        sys.exit(f"{who}: `{' '.join(cmd)}` failed (exit {r.returncode}) in {cwd}; its output is in {log.name}")
    return r.stdout, seconds


def stage_times(output: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in DONE.finditer(output)}


def parse_variant(text: str) -> tuple[str, list[str]]:
    """A sweep's ``--variant``: ``NAME`` or ``NAME=KEY=VALUE[,KEY=VALUE...]`` -> (name, ["KEY=VALUE", ...])."""
    name, _, sets = text.partition("=")
    pairs = [s for s in sets.split(",") if s] if sets else []
    bad = [s for s in pairs if "=" not in s]
    if not name or bad:
        raise SystemExit(f"--variant {text!r}: expected NAME or NAME=KEY=VALUE[,KEY=VALUE...]")
    return name, pairs


def base_parser(doc: str) -> argparse.ArgumentParser:
    """The command line every DAG-running benchmark here takes: --seeds, --workdir, --out."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workdir", type=Path, help="where the clone goes (default: a new temporary folder)")
    ap.add_argument("--out", type=Path, help="write the figures here as JSON")
    return ap


def sweep_parser(doc: str) -> argparse.ArgumentParser:
    """A sweep's command line: ``base_parser``'s and --variant (``parse_variant``)."""
    ap = base_parser(doc)
    ap.add_argument("--variant", action="append", default=[], type=parse_variant, metavar="NAME[=KEY=VALUE,...]",
                    help="NAME or NAME=KEY=VALUE[,KEY=VALUE...]; none: the committed params alone")
    return ap


def sweep(stage: str | Sequence[str], seeds: list[int], variants: list[tuple[str, list[str]]], work: Path | None,
          who: str, read: Callable[[Path], dict], timed: str | None = None) -> tuple[str, list[dict]]:
    """One stage's levers (qa_sweep.py, siglip_sweep.py, captioner_sweep.py): in one clone of HEAD under
    ``work`` (None: a new temporary folder), for each seed and each (name, ["KEY=VALUE", ...]) variant
    (none: the committed params alone), ``dvc exp run STAGE [STAGE ...] -S seed=N -S KEY=VALUE ...`` from
    the committed params (``stage``: one stage or several, each run with what it depends on);
    ``read(clone)`` gives the run's figures. (the commit, one dict a run: variant, set, seed, stage_seconds
    of ``timed`` (default: ``stage``, the first of several) and what ``read`` gave)."""
    stages = [stage] if isinstance(stage, str) else list(stage)
    work = scratch(work, who)
    clone, commit = clone_head(work)
    results = []
    with open(work / f"{who}.log", "w") as log:
        print(f"{who}: {commit[:10]} in {clone}; log {log.name}", file=sys.stderr)
        for seed in seeds:
            for name, sets in variants or [("committed", [])]:
                committed_params(clone)  # each run starts from the committed params (`-S` edits them in place)
                out, seconds = run(["dvc", "exp", "run", *stages, "-S", f"seed={seed}",
                                    *[a for kv in sets for a in ("-S", kv)]], clone, log, who=who)
                results.append({"variant": name, "set": sets, "seed": seed, **read(clone),
                                "stage_seconds": stage_times(out).get(timed or stages[0])})
                print(f"{who}: {name}, seed {seed} ({seconds:.0f} s)", file=sys.stderr)
        committed_params(clone)
    return commit, results


def report(commit: str, seeds: list[int], what: str, table: str, results: list[dict], out: Path | None) -> None:
    """A sweep's output: the commit, the seeds and what was scored (``what``), ``table``, and with ``out``
    the runs as JSON there."""
    print(f"Commit {commit[:10]}; seeds {seeds}; {what}.\n")
    print(table)
    if out:
        out.write_text(json.dumps({"commit": commit, "runs": results}, indent=1) + "\n")


def evaluations(repo: Path = REPO) -> dict[str, str]:
    """The evaluation stages of ``repo``'s dvc.yaml, each with the reports/eval file it writes (a path
    relative to the repository); ``report`` copies each file's metrics into reports/metrics.json under
    the file's name."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    return {name: out for name, s in stages.items() for out in s.get("outs") or []
            if isinstance(out, str) and out.startswith("reports/eval/")}


def evaluated(clone: Path, stages) -> dict:
    """The headline sections of the evaluation ``stages``, from their reports/eval files (what ``report``
    copies into reports/metrics.json): after ``dvc exp run`` of those stages they are the run's."""
    return {Path(out).stem: json.loads((clone / out).read_text())["metrics"]
            for stage, out in evaluations(clone).items() if stage in stages}


def mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: list[dict]) -> str:
    seeds = [r["seed"] for r in results]
    lines = ["| | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for key, name in HEADLINES:
        vals = [lookup(r["metrics"], key) for r in results]
        if any(v is None for v in vals):
            continue
        lines.append(f"| {name} (`{key}`) | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {mean_sd(vals)} |")
    stages = sorted({s for r in results for s in r["stage_seconds"]}, key=lambda s: -results[0]["stage_seconds"].get(s, 0))
    for s in stages:
        vals = [r["stage_seconds"].get(s, 0) for r in results]
        lines.append(f"| {s}, s | " + " | ".join(map(str, vals)) + f" | {statistics.mean(vals):.0f} |")
    totals = [sum(r["stage_seconds"].values()) for r in results]
    lines.append("| **stage time, s** | " + " | ".join(map(str, totals)) + f" | {statistics.mean(totals):.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a params.yaml change applied to every run, as `dvc exp run -S` takes it")
    ap.add_argument("--lr", help="also time `dvc exp run -S lr=LR` after the first seed's run")
    ap.add_argument("--stage", action="append", default=[], choices=sorted(evaluations()),
                    help="run this evaluation and what it needs only (`dvc exp run STAGE`); repeatable")
    args = ap.parse_args()

    work = scratch(args.workdir, "seeds")
    clone, commit = clone_head(work)
    sets = [a for kv in args.set for a in ("-S", kv)]
    results, lr_exp = [], None
    with open(work / "seeds.log", "w") as log:
        print(f"seeds: {commit[:10]} in {clone}; log {log.name}", file=sys.stderr)
        for i, seed in enumerate(args.seeds):
            committed_params(clone)  # each run: the committed params, its seed and --set, nothing else
            out, seconds = run(["dvc", "exp", "run", *args.stage, "-S", f"seed={seed}", *sets], clone, log)
            metrics = (evaluated(clone, args.stage) if args.stage
                       else json.loads((clone / "reports/metrics.json").read_text()))
            shutil.copy(clone / "dvc.lock", work / f"dvc.lock.seed{seed}")  # what each run made, to compare
            results.append({"seed": seed, "metrics": metrics, "stage_seconds": stage_times(out),
                            "wall_seconds": round(seconds, 1)})
            print(f"seeds: seed {seed} in {seconds:.0f} s", file=sys.stderr)
            if i == 0 and args.lr:
                out, seconds = run(["dvc", "exp", "run", "-S", f"seed={seed}", *sets, "-S", f"lr={args.lr}"], clone, log)
                lr_exp = {"lr": args.lr, "wall_seconds": round(seconds, 1), "stage_seconds": stage_times(out)}
                print(f"seeds: `dvc exp run -S lr={args.lr}` in {seconds:.0f} s", file=sys.stderr)
    print(f"Commit {commit[:10]}{', with ' + ', '.join(args.set) if args.set else ''}; seeds {args.seeds}"
          f"{'; up to ' + ', '.join(args.stage) if args.stage else ''}.\n")
    print(table(results))
    if lr_exp:
        print(f"\n`dvc exp run -S lr={args.lr}` (after seed {args.seeds[0]}): {lr_exp['wall_seconds']:.0f} s wall, "
              f"stages {lr_exp['stage_seconds']}")
    if args.out:
        args.out.write_text(json.dumps({"commit": commit, "set": args.set, "stage": args.stage, "runs": results,
                                        "lr_exp": lr_exp},
                                       indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
