"""What `python -m vlmpipe.loop.launch` adds to a one-process stage: the launcher against running the script.

    python benchmarks/bench_launch.py [--runs 10]

Times, as whole processes, ``python -m vlmpipe.loop.launch stage.py`` and ``python stage.py`` for a stage
stand-in that imports vlmpipe and torch and exits, in a scratch folder holding the repository's
params.yaml (launch defaults: 1 process, 1 machine, so the launcher reads the params and execs the
script). Runs alternate (A B A B ...) so a drifting machine hits both alike; prints the medians and
their difference, the figure the README's "about a second per stage" bound is about.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE = "import vlmpipe, torch\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(REPO / "params.yaml", Path(tmp) / "params.yaml")
        (Path(tmp) / "stage.py").write_text(STAGE)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        cmds = {"launcher": [sys.executable, "-m", "vlmpipe.loop.launch", "stage.py"], "script": [sys.executable, "stage.py"]}
        times: dict[str, list[float]] = {k: [] for k in cmds}
        for i in range(a.runs + 1):  # the first round warms the file cache and is not counted
            for name, cmd in cmds.items():
                t = time.perf_counter()
                subprocess.run(cmd, cwd=tmp, env=env, check=True)
                if i:
                    times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:9s} median {med[k]:.3f} s  (min {min(v):.3f}, max {max(v):.3f}, {len(v)} runs)")
    print(f"launcher overhead: {med['launcher'] - med['script']:+.3f} s per stage "
          f"({med['launcher'] / med['script']:.2f}x the script's start-up)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
