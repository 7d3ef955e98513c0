"""The merged QA export against the adapter model it came from: greedy answers on held-out questions.

    python benchmarks/export_agreement.py [--questions 200] [--root DIR] [--device cpu] [--out FILE]

Exports ``models/phi2_vlm`` (the 4-bit NF4 base + LoRA adapter, as trained) with ``python -m vlmpipe
export`` into a temporary folder (the adapter merged into the dequantised base), then asks both the
first ``--questions`` held-out questions of ``data/cifar_qa.csv`` (its test rows, in order, images from
``data/cifar``), each after the true earlier turns of its row (as ``evaluate_qa`` asks them), through
one ``predict`` input (JSON Lines with ``messages``). Prints how many answers are equal, each model's
exact match against the truth, and the questions where they differ.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_questions(root: Path, n: int, tmp: Path) -> list[dict]:
    from PIL import Image

    from vlmpipe.data.cifar import load_split
    from vlmpipe.data.qa import A_COLS, Q_COLS, part, read_qa_csv

    test = part(read_qa_csv(root / "data/cifar_qa.csv", root / "data/cifar"), "test")
    splits = {s: load_split(root / "data/cifar", s) for s in set(test["Split"])}
    rows = []
    for r in test.itertuples(index=False):
        d = r._asdict()
        img = tmp / f"{r.Split}_{r.Dataset_Index:05d}.png"
        Image.fromarray(splits[r.Split].images[r.Dataset_Index]).save(img)
        msgs = []
        for q, a in zip(Q_COLS, A_COLS):
            if not d[q] or len(rows) == n:
                continue
            rows.append({"image": img.name, "messages": msgs + [{"role": "user", "content": d[q]}], "truth": d[a]})
            msgs = msgs + [{"role": "user", "content": d[q]}, {"role": "assistant", "content": d[a]}]
        if len(rows) == n:
            break
    (tmp / "questions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--root", type=Path, default=REPO, help="where models/ and data/ are (default: the repo)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", type=Path, default=None, help="also write the figures and differing answers as JSON")
    args = ap.parse_args(argv)
    from vlmpipe.face import predict
    from vlmpipe.face.export import export
    from vlmpipe.scoring.metrics import normalize_answer

    root = args.root.resolve()
    with tempfile.TemporaryDirectory(prefix="export-agreement-") as t:
        tmp = Path(t)
        rows = write_questions(root, args.questions, tmp)
        t0 = time.perf_counter()
        export(root / "models/phi2_vlm", tmp / "export", device=args.device)
        export_s = time.perf_counter() - t0
        answers = {}
        for name, d in (("adapter", root / "models/phi2_vlm"), ("merged", tmp / "export")):
            model = predict.load_model(d, args.device)
            answers[name] = [r.get("answer") for r in predict.predict_rows(model, predict.read_rows(tmp / "questions.jsonl"))]
    equal = sum(a == b for a, b in zip(answers["adapter"], answers["merged"]))
    em = {k: sum(normalize_answer(a or "") == normalize_answer(r["truth"]) for a, r in zip(v, rows)) / len(rows)
          for k, v in answers.items()}
    diff = [{"image": r["image"], "question": r["messages"][-1]["content"], "truth": r["truth"], "adapter": a, "merged": b}
            for r, a, b in zip(rows, answers["adapter"], answers["merged"]) if a != b]
    print(f"{len(rows)} held-out questions: merged == adapter on {equal}/{len(rows)}; exact match adapter "
          f"{em['adapter']:.3f}, merged {em['merged']:.3f}; export took {export_s:.1f}s on {args.device}")
    for x in diff:
        print(f"  differs: {x['image']} {x['question']!r}: adapter {x['adapter']!r}, merged {x['merged']!r}, truth {x['truth']!r}")
    if args.out:
        args.out.write_text(json.dumps({"questions": len(rows), "equal": equal, "exact_match": em,
                                        "export_s": export_s, "differ": diff}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
