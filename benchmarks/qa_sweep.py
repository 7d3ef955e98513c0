"""The QA model's levers over seeds: ``train_phi2_qlora`` per seed and per variant, and why colour varies.

Clones this repository (its committed HEAD) into a scratch folder once and runs there, for each seed
and each variant, ``dvc exp run train_phi2_qlora -S seed=N [-S key=value ...]``: the command a user
runs. A seed's first run builds what the QA model reads (data, SigLIP, its embeddings, the tiny base:
about 6 minutes on a 2-core CPU); its other variants retrain the QA model alone (about 2 minutes),
and a variant that changes the base too (``phi2.tiny``) rebuilds that, DVC's run cache restoring it after.

Per run it prints the QA stage's held-out exact match, its colour and "is this a …?" scores, and a
diagnosis: the share of the variance that colour explains, in the SigLIP features of the training
images and in the prefix tokens the trained projector makes of them (between-colour sum of squares
over the total). The QA model answers colour as well as its projector keeps colour in the prefix:
the features hold it on every seed, a projector that spends the prefix on the shape's kind (the
answer to 5 of the 7 question types) squeezes it out (docs/limits.md).

Usage::

    python benchmarks/qa_sweep.py --seeds 1 2 --variant base --variant wd=phi2.train.weight_decay=0.1
    python benchmarks/qa_sweep.py --variant r64=phi2.lora_r=64,phi2.lora_alpha=128 --out sweep.json

A variant is NAME or NAME=KEY=VALUE[,KEY=VALUE...] (params.yaml keys, as `dvc exp run -S` takes
them); without ``--variant`` the committed params run alone. Run it on an idle machine.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from seeds import report, sweep, sweep_parser  # noqa: E402 - the seeds benchmark's sweep runner


def variance_share(x: torch.Tensor, labels: list[str]) -> float:
    """The share of the total variance of the rows of ``x`` [N, F] that the groups ``labels`` explain:
    between-group sum of squares over the total sum of squares (0: the groups look alike, 1: each
    group is one point)."""
    x = x.double() - x.double().mean(0)
    total = float((x ** 2).sum())
    names = sorted(set(labels))
    index = torch.tensor([names.index(a) for a in labels])
    between = sum(float((x[index == k].mean(0) ** 2).sum()) * int((index == k).sum()) for k in range(len(names)))
    return between / total if total else 0.0


def colour_shares(clone: Path) -> dict[str, float]:
    """Colour's variance share in the SigLIP features of the training images asked about colour, and in
    the prefix the clone's trained QA model makes of them."""
    from vlmpipe.data.features import siglip_identity
    from vlmpipe.models.qa_model import load_qa_model
    from vlmpipe.qa.stage import qa_data

    _, (convs, types, feats), _ = qa_data(clone / "data/cifar_qa.csv", clone / "data/cifar", clone / "data/embeddings",
                                          siglip_identity(clone / "models/siglip"))
    rows = [(n, conv[k][1]) for n, (conv, ts) in enumerate(zip(convs, types)) for k, t in enumerate(ts) if t == "colour"]
    if not rows:
        return {}
    x = feats[[n for n, _ in rows]].float()
    labels = [a for _, a in rows]
    model = load_qa_model(clone / "models/phi2_vlm", "cpu")
    with torch.no_grad():
        prefix = model.projector(x).reshape(len(x), -1).float()
    return {"features": variance_share(x.reshape(len(x), -1), labels), "prefix": variance_share(prefix, labels)}


def table(results: list[dict]) -> str:
    lines = ["| variant | seed | exact match | colour | \"is this a …?\" | colour's share: features → prefix | QA stage, s |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        by = r["by_type"]
        share = r["colour_share"]
        lines.append(f"| {r['variant']} | {r['seed']} | {r['exact_match']:.3f} | {by.get('colour', float('nan')):.2f} | "
                     f"{by.get('class_yesno', float('nan')):.2f} | "
                     + (f"{share['features']:.3f} → {share['prefix']:.3f}" if share else "–")
                     + f" | {r['stage_seconds'] if r['stage_seconds'] is not None else '–'} |")
    return "\n".join(lines)


def main() -> int:
    ap = sweep_parser(__doc__)
    args = ap.parse_args()

    def read(clone: Path) -> dict:
        m = json.loads((clone / "reports/phi2_vlm/metrics.json").read_text())
        return {"exact_match": m["exact_match"], "by_type": m["exact_match_by_type"], "colour_share": colour_shares(clone)}

    commit, results = sweep("train_phi2_qlora", args.seeds, args.variant, args.workdir, "qa_sweep", read)
    report(commit, args.seeds, "the QA stage's own held-out questions", table(results), results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
