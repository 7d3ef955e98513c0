"""The toy training task (tests/_toy_train.py) run the way a training stage runs: inside
``vlmpipe.core.stage.stage`` under ``stage_entry``, from a folder holding a ``params.yaml`` and a
``dvc.yaml`` whose stage ``train_toy`` declares ``models/checkpoints/toy`` as a ``persist: true`` output.
For tests/test_checkpoint_sync.py.

    python tests/_toy_stage.py WORKDIR SLEEP_PER_ITEM

Writes WORKDIR/w.safetensors (the trained weights) and WORKDIR/w.json (metrics, resumed_from_step).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from safetensors.torch import save_file  # noqa: E402

from _toy_train import make_cfg, make_task  # noqa: E402
from vlmpipe.core.errors import stage_entry  # noqa: E402
from vlmpipe.core.stage import stage  # noqa: E402
from vlmpipe.loop.train import fit, trainable_state  # noqa: E402


@stage_entry
def main() -> None:
    os.chdir(sys.argv[1])
    task = make_task(sleep=float(sys.argv[2]))
    with stage("train_toy", {}) as s:
        res = fit(task, make_cfg(), seed=0, ckpt_dir=Path("models/checkpoints/toy"), report_dir=Path("reports/toy"),
                  identity={"toy": 1}, run=s.run)
    save_file(trainable_state(task.model), "w.safetensors")
    Path("w.json").write_text(json.dumps({"metrics": res.metrics, "resumed_from_step": res.resumed_from_step}))


if __name__ == "__main__":
    raise SystemExit(main())
