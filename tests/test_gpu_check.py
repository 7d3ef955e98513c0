"""benchmarks/gpu_check.py at tiny sizes on the CPU, so the GPU check cannot rot between GPU runs:
every part builds its model with the pipeline's code, steps, and reports throughput and MFU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_part_at_tiny_size(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--size", "tiny", "--device", "cpu",
                        "--steps", "1", "--warmup", "1", "--out", str(out)], cwd=tmp_path,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["device"] and res["size"] == "tiny" and res["precision"] == "float32"
    checks = res["checks"]
    assert set(checks) == {"siglip", "clip_precompute", "captioner", "phi2_qlora"}
    for name, c in checks.items():
        assert c["samples_per_s"] > 0, (name, c)
    for name in ("siglip", "captioner", "phi2_qlora"):
        assert 0 < checks[name]["mfu"] < 1 and "calibrated" in checks[name]["peak_source"], checks[name]
    assert abs(checks["captioner"]["tokens_per_s"] / checks["captioner"]["samples_per_s"] - 40) < 0.1
    assert checks["phi2_qlora"]["layers"] == 2 and checks["phi2_qlora"]["lora_params_m"] > 0
