"""benchmarks/seeds.py's reading of a run (the DAG runs themselves are the benchmark, not a test)."""
from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _seeds():
    spec = importlib.util.spec_from_file_location("seeds", REPO / "benchmarks/seeds.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stage_times_are_read_from_the_stages_log_lines():
    out = ("19:07:16 INFO download_coco: download_coco done in 9s\n"
           "19:11:01 INFO train_siglip: train_siglip done in 205s (resumed)\n"
           "19:11:02 INFO vlmpipe.siglip.stage: siglip: done in 3s of something else\n")
    assert _seeds().stage_times(out) == {"download_coco": 9, "train_siglip": 205}


def test_table_gives_each_headline_per_seed_and_mean_sd():
    m = _seeds()
    runs = [{"seed": s, "metrics": {"siglip": {"i2t_r1": r}, "chat": {"by_type": {"followup": f}}},
             "stage_seconds": {"train_siglip": t, "report": 5}} for s, r, f, t in
            [(0, 0.85, 0.4, 200), (1, 0.95, 0.5, 190), (2, 0.97, 0.6, 210)]]
    text = m.table(runs)
    sd = statistics.stdev([0.85, 0.95, 0.97])
    assert f"| SigLIP image→text R@1 (`siglip.i2t_r1`) | 0.850 | 0.950 | 0.970 | 0.923 ± {sd:.3f} |" in text
    assert "(`chat.by_type.followup`) | 0.400 | 0.500 | 0.600 | 0.500 ± 0.100 |" in text
    assert "vqa.accuracy" not in text  # a key no run has is left out
    assert "| train_siglip, s | 200 | 190 | 210 | 200 |" in text
    assert "| **stage time, s** | 205 | 195 | 215 | 205 |" in text
