"""SigLIP's levers over seeds: ``train_siglip`` per seed and per variant, and how soon it converges.

Clones this repository (its committed HEAD) into a scratch folder once and runs there, for each seed
and each variant, ``dvc exp run train_siglip -S seed=N [-S key=value ...]``: the command a user runs.
A seed's first run builds the data SigLIP reads (about 10 s); every run then trains SigLIP alone
(about 2.5 minutes at the default's 24 epochs on a 2-core CPU).

Per run it prints the stage's held-out scores after the last epoch (zero-shot accuracy, image→text
and text→image R@1), the first epoch at which image→text R@1 reached ``--target``, and the stage's
time. Usage::

    python benchmarks/siglip_sweep.py --variant base --variant lr4e-3=siglip.train.lr=4e-3
    python benchmarks/siglip_sweep.py --seeds 0 --variant bs64=siglip.train.batch_size=64 --out sweep.json

A variant is NAME or NAME=KEY=VALUE[,KEY=VALUE...] (params.yaml keys, as `dvc exp run -S` takes
them); without ``--variant`` the committed params run alone. Run it on an idle machine.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from seeds import report, sweep, sweep_parser  # noqa: E402 - the seeds benchmark's sweep runner


def first_epoch(curve: Path, key: str, target: float) -> int | None:
    """The first epoch of the validation curve ``curve`` at which ``key`` reached ``target`` (None: never)."""
    with open(curve, newline="") as f:
        for row in csv.DictReader(f):
            if float(row[key]) >= target:
                return int(row["epoch"])
    return None


def table(results: list[dict], target: float) -> str:
    lines = [f"| variant | seed | zero-shot | image→text R@1 | text→image R@1 | first epoch with R@1 ≥ {target} | "
             f"SigLIP stage, s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['variant']} | {r['seed']} | {r['zero_shot_acc']:.3f} | {r['i2t_r1']:.3f} | "
                     f"{r['t2i_r1']:.3f} | {r['first_epoch'] or '–'} of {r['epochs']} | "
                     f"{r['stage_seconds'] if r['stage_seconds'] is not None else '–'} |")
    return "\n".join(lines)


def main() -> int:
    ap = sweep_parser(__doc__)
    ap.add_argument("--target", type=float, default=0.9, help="the image->text R@1 whose first epoch is reported")
    args = ap.parse_args()

    def read(clone: Path) -> dict:
        m = json.loads((clone / "reports/siglip/metrics.json").read_text())
        return {"epochs": m["epochs"], **{k: m[k] for k in ("zero_shot_acc", "i2t_r1", "t2i_r1")},
                "first_epoch": first_epoch(clone / "reports/siglip/val_curve.csv", "i2t_r1", args.target)}

    commit, results = sweep("train_siglip", args.seeds, args.variant, args.workdir, "siglip_sweep", read)
    report(commit, args.seeds, "the SigLIP stage's own held-out scores", table(results, args.target), results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
