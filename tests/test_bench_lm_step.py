"""benchmarks/bench_lm_step.py runs on the default's params and times all four variants of the step
(a benchmark nobody runs rots; this keeps it running, at one step a variant)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_lm_step_benchmark_times_four_variants_of_the_chat_step():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_lm_step.py"), "--steps", "1", "--rounds", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = re.findall(r"^\s+(gelu_new|gelu_pytorch_tanh)\s+head on (every position|targets only)\s+([\d.]+) ms a step\s+"
                      r"([\d.]+)x$", out.stdout, re.M)
    assert {(a, h) for a, h, _, _ in rows} == {(a, h) for a in ("gelu_new", "gelu_pytorch_tanh")
                                              for h in ("every position", "targets only")}
    assert all(float(ms) > 0 for _, _, ms, _ in rows)
    assert [r for r in rows if r[:2] == ("gelu_new", "every position")][0][3] == "1.00"  # the baseline
    share = int(re.search(r"targets (\d+) % of the text tokens", out.stdout).group(1))
    assert 5 <= share <= 60  # answers after questions: a minority of the tokens, never none
