"""The captioner's levers over seeds: ``train_gpt2_captioner`` per seed and per variant, scored on the held-out scenes.

Clones this repository (its committed HEAD) into a scratch folder once and runs there, for each seed
and each variant, ``dvc exp run evaluate_captioner -S seed=N [-S key=value ...]`` (with ``--chat``:
``evaluate_captioner evaluate_chat``, so the chat model is continued from each captioner and scored too): the command a
user runs. A seed's first run builds what the captioner reads (data, SigLIP, its embeddings: about 4
minutes on a 2-core CPU); its other variants retrain the captioner alone (about 12 s an epoch) and,
with ``--chat``, the chat model (about 3 minutes).

Per run it prints the held-out scenes captioned entirely right and the shapes named right (every
shape's size, colour and kind: ``vlmpipe/scoring/scene.py``), CIDEr, with ``--chat`` the chat model's
exact match and descriptions, and the captioner stage's time. Usage::

    python benchmarks/captioner_sweep.py --variant e5=captioner.train.epochs=5 --variant e16=captioner.train.epochs=16
    python benchmarks/captioner_sweep.py --seeds 1 --chat --variant committed --out sweep.json

A variant is NAME or NAME=KEY=VALUE[,KEY=VALUE...] (params.yaml keys, as `dvc exp run -S` takes
them); without ``--variant`` the committed params run alone. Run it on an idle machine.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from seeds import evaluated, report, sweep, sweep_parser  # noqa: E402 - the seeds benchmark's sweep runner


def table(results: list[dict]) -> str:
    chat = any("chat_exact_match" in r for r in results)
    head = "| variant | seed | scenes entirely right | shapes right | CIDEr |" + (
        " chat exact match | chat descriptions |" if chat else "") + " captioner stage, s |"
    lines = [head, "|" + "---|" * head.count(" |")]
    for r in results:
        row = (f"| {r['variant']} | {r['seed']} | {r['scene_right']:.3f} | {r['scene_shapes_right']:.3f} | "
               f"{r['cider']:.3f} |")
        if chat:
            row += f" {r['chat_exact_match']:.3f} | {r['chat_describe']:.3f} |"
        lines.append(row + f" {r['stage_seconds'] if r['stage_seconds'] is not None else '–'} |")
    return "\n".join(lines)


def main() -> int:
    ap = sweep_parser(__doc__)
    ap.add_argument("--chat", action="store_true", help="continue the chat model from each captioner and score it")
    args = ap.parse_args()
    # With --chat both evaluations are targets: evaluate_chat does not depend on evaluate_captioner.
    stages = ["evaluate_captioner", "evaluate_chat"] if args.chat else ["evaluate_captioner"]

    def read(clone: Path) -> dict:
        m = evaluated(clone, stages)
        out = {k: m["captioner"][k] for k in ("scene_right", "scene_shapes_right", "cider")}
        if args.chat:
            out.update(chat_exact_match=m["chat"]["exact_match"], chat_describe=m["chat"]["by_type"]["describe"])
        return out

    commit, results = sweep(stages, args.seeds, args.variant, args.workdir, "captioner_sweep", read,
                            timed="train_gpt2_captioner")
    report(commit, args.seeds, "held-out scores of each run", table(results), results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
