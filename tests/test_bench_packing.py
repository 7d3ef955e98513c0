"""benchmarks/bench_packing.py runs on the default's params and times both models padded and packed (a
benchmark nobody runs rots; this keeps it running, at one step a variant)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_packing_benchmark_times_both_models_padded_and_packed():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_packing.py"), "--steps", "1", "--rounds", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = re.findall(r"^\s+(captioner|chat)\s+batch\s+(\d+)\s+(padded|packed)\s+([\d.]+) ms a step\s+(\d+) % of "
                      r"positions filled\s+([\d.]+)x$", out.stdout, re.M)
    assert {(m, w) for m, _, w, *_ in rows} == {(m, w) for m in ("captioner", "chat") for w in ("padded", "packed")}
    filled = {(m, w): int(f) for m, _, w, _, f, _ in rows}
    for m in ("captioner", "chat"):
        assert filled[m, "packed"] > filled[m, "padded"]  # packing leaves less padding
        assert 0 < filled[m, "padded"] < 100 and filled[m, "packed"] <= 100
    assert all(x == "1.00" for m, _, w, _, _, x in rows if w == "padded")  # each model's baseline
