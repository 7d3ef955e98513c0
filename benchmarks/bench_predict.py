"""Batch inference throughput: one ``python -m vlmpipe predict`` call against one CLI call per image.

    python benchmarks/bench_predict.py [--images 64] [--cli-calls 4] [--batch-size 32] [--root DIR] [--out FILE]

On the trained models under ``--root`` (default: this repository, after ``make repro``):

- captioner (``models/captioner``) on ``--images`` held-out COCO val images (``data/coco``);
- QA model (``models/phi2_vlm``) on as many held-out CIFAR images (``data/cifar``), each asked the
  first question of its row in ``data/cifar_qa.csv`` (a JSON Lines input).

Each way is timed as a user runs it, a whole process from the shell: ``predict`` once over all the
images (process start, model load, decode, featurise, generate, write), and ``--cli-calls`` calls of
``python -m vlmpipe caption IMAGE`` / ``ask IMAGE QUESTION``, one image each, whose mean time is
extrapolated to all the images (running 64 of them would take minutes and say nothing more: every call
loads the same model). Half the single calls run before ``predict``, half after, so load from other
processes on a shared machine hits both alike. The single calls' answers are checked to equal
``predict``'s for the same images. Prints images/s of each way and their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_inputs(root: Path, n: int, tmp: Path) -> dict[str, dict]:
    """Held-out images as files: COCO val images for the captioner, CIFAR test images + questions for QA."""
    from vlmpipe.data.cifar import load_split
    from vlmpipe.data.coco import CocoCaptions
    from vlmpipe.data.qa import part, read_qa_csv

    coco = CocoCaptions(root / "data/coco", "val")
    cap_dir = tmp / "coco_val"
    cap_dir.mkdir()
    cap_images = []
    with zipfile.ZipFile(coco.archive) as zf:
        for i in coco.ids[:n]:
            p = cap_dir / f"{i:012d}.jpg"
            p.write_bytes(zf.read(coco.member(i)))  # the JPEG file as it is in the archive
            cap_images.append(p)

    from PIL import Image

    test = part(read_qa_csv(root / "data/cifar_qa.csv", root / "data/cifar"), "test").head(n)
    splits = {s: load_split(root / "data/cifar", s) for s in set(test["Split"])}
    qa_dir = tmp / "cifar_test"
    qa_dir.mkdir()
    rows, qa_images = [], []
    for r in test.itertuples(index=False):
        p = qa_dir / f"{r.Split}_{r.Dataset_Index:05d}.png"
        Image.fromarray(splits[r.Split].images[r.Dataset_Index]).save(p)
        rows.append({"image": p.name, "question": r.Q1})
        qa_images.append((p, r.Q1))
    (qa_dir / "questions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    return {"captioner": {"model": root / "models/captioner", "input": cap_dir, "singles": [(p,) for p in cap_images],
                          "field": "caption", "source": f"{len(cap_images)} COCO val images ({root / 'data/coco'})"},
            "qa": {"model": root / "models/phi2_vlm", "input": qa_dir / "questions.jsonl", "singles": qa_images,
                   "field": "answer", "source": f"{len(rows)} held-out CIFAR images + their Q1"}}


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return dt, r.stdout


def bench(name: str, spec: dict, calls: int, batch_size: int, tmp: Path) -> dict:
    py = [sys.executable, "-m", "vlmpipe"]
    singles = spec["singles"][:calls]

    def single(item) -> tuple[float, str]:
        if name == "captioner":
            dt, out = timed(py + ["caption", str(item[0]), "--model", str(spec["model"])])
            return dt, out.rstrip("\n").split("\t", 1)[1]
        dt, out = timed(py + ["ask", str(item[0]), item[1], "--model", str(spec["model"])])
        return dt, out.rstrip("\n")

    half = len(singles) // 2
    before = [single(s) for s in singles[:half]]
    out_file = tmp / f"{name}.jsonl"
    t_predict, _ = timed(py + ["predict", "--model", str(spec["model"]), str(spec["input"]), "-o", str(out_file),
                               "--batch-size", str(batch_size)])
    after = [single(s) for s in singles[half:]]
    recs = [json.loads(x) for x in out_file.read_text().splitlines()]
    n = len(recs)
    one = before + after
    agree = sum(" ".join(recs[i][spec["field"]].split()) == text for i, (_, text) in enumerate(one))
    per_call = sum(dt for dt, _ in one) / len(one)
    return {"model": name, "source": spec["source"], "images": n, "predict_s": t_predict,
            "predict_images_per_s": n / t_predict, "cli_calls": len(one), "cli_s_per_image": per_call,
            "cli_images_per_s": 1 / per_call, "cli_extrapolated_s": per_call * n,
            "ratio": (n / t_predict) * per_call, "single_equal_predict": f"{agree}/{len(one)}",
            "errors": sum("error" in r for r in recs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=64, help="held-out images per model (default: %(default)s)")
    ap.add_argument("--cli-calls", type=int, default=4, help="single-image CLI calls timed per model (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=32, help="predict's --batch-size (default: %(default)s)")
    ap.add_argument("--root", type=Path, default=REPO, help="where models/ and data/ are (default: the repo)")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as t:
        tmp = Path(t)
        specs = write_inputs(root, args.images, tmp)
        rows = [bench(name, spec, args.cli_calls, args.batch_size, tmp) for name, spec in specs.items()]
    lines = [f"{'model':<10} {'way':<34} {'images':>6} {'seconds':>8} {'images/s':>9}"]
    for r in rows:
        lines.append(f"{r['model']:<10} {'predict (one call, batch ' + str(args.batch_size) + ')':<34} "
                     f"{r['images']:>6} {r['predict_s']:>8.1f} {r['predict_images_per_s']:>9.2f}")
        lines.append(f"{'':<10} {'one CLI call per image (' + str(r['cli_calls']) + ' timed)':<34} {r['images']:>6} "
                     f"{r['cli_extrapolated_s']:>7.1f}* {r['cli_images_per_s']:>9.2f}")
    lines.append("* extrapolated: the mean time of the timed single-image calls x the images")
    for r in rows:
        lines.append(f"{r['model']}: predict / one call per image = {r['ratio']:.1f}x "
                     f"({r['source']}; single-call answers equal predict's: {r['single_equal_predict']}; "
                     f"rows with an error: {r['errors']})")
    sys.stdout.write("\n".join(lines) + "\n")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
