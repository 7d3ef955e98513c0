"""The one context every stage script runs in, so a stage script is its paths and one call.

    @stage_entry
    def main() -> None:
        with stage("train_siglip", {"siglip": SiglipParams}, device="siglip.train.device") as s:
            train_siglip.run_stage(s.p.siglip, seed=s.p.seed, ..., run=s.run)
            s.register("siglip", "models/siglip")

In order, once per stage: load and check the params sections the stage reads (``seed``, ``lr`` and
``launch`` always); run the preflight (everything this and the later stages must fetch, checked in
seconds, one line for what cannot be had); join the process group when ``device`` is given (under
torchrun: the rank's GPU); with ``checkpoints.remote`` set, start keeping the stage's checkpoints on
S3 (its newest one fetched where there is none here); seed every RNG; open the stage's MLflow run on
rank 0. On the way out: end the run, wait for the last checkpoint upload, log the stage's time, leave
the process group.

Tracking, registration, the preflight and the checkpoint uploads (``vlmpipe/ops``) write no DVC
output: they are imported here but are no stage's DVC dependency, and a test runs the tiny DAG with
tracking on and off and compares every output.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from vlmpipe.core.errors import UserError
from vlmpipe.core.io import write_json
from vlmpipe.core.params import flatten, load_params, to_dict
from vlmpipe.core.runtime import seed_everything, setup_distributed, shutdown_distributed
from vlmpipe.ops import checkpoint_sync, registry
from vlmpipe.ops.preflight import load_all, preflight
from vlmpipe.ops.tracking import Run, stage_run


@dataclasses.dataclass
class Stage:
    name: str
    p: Any                      # the checked params: .seed, .lr, .launch and the sections asked for
    run: Run                    # the stage's MLflow run (inert on ranks > 0 and with tracking off)
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes outputs, logs and registers."""
        return self.rank == 0

    def register(self, kind: str, model_dir: str | Path) -> None:
        """On rank 0: the model as a new registered version (``vlmpipe.ops.registry.log_model``)."""
        if self.main:
            registry.log_model(self.run, kind, model_dir)

    def score_version(self, kind: str, model_dir: str | Path, metrics: dict) -> None:
        """On rank 0: the registered version of ``model_dir``'s weights gets ``metrics`` and the alias
        ``champion`` or ``candidate`` (``vlmpipe.ops.registry.score_version``)."""
        if self.main:
            registry.score_version(self.run, kind, model_dir, metrics)

    def write_evaluation(self, out: str | Path, metrics: dict, examples: list) -> None:
        """One model's held-out evaluation: its section of reports/metrics.json and its examples (the
        predictions beside the truth), to ``out`` and, the numbers, to the run."""
        write_json(out, {"metrics": metrics, "examples": examples})
        self.run.log_metrics({k: v for k, v in flatten(metrics).items() if isinstance(v, (int, float))})


@contextlib.contextmanager
def stage(name: str, sections: Mapping[str, type], *, device: str | None = None,
          top: tuple[str, ...] = ("seed",), needs: tuple[str | Path, ...] = (),
          model: str | None = None) -> Iterator[Stage]:
    """Run stage ``name`` reading params ``sections`` (name -> dataclass) and the top-level keys ``top``.

    ``model``: the model the stage trains or scores, as ``reports/metrics.json`` names it (``siglip``,
    ``vqa``, ``captioner``, ``chat``): the namespace of its MLflow metric names.

    ``device``: the param (``siglip.train.device``) choosing the device of a stage that computes on
    one; the stage then joins torchrun's process group when launched by it. ``needs``: upstream
    outputs that must exist (one line naming the first missing one, before any work).
    """
    t0 = time.perf_counter()
    for need in map(Path, needs):
        if not need.exists():
            raise UserError(f"{need}: missing upstream output (run `dvc repro` to build it)")
    p = load_params(sections)
    everything = load_all()
    preflight(name, everything)  # anything this or a later stage cannot fetch: one line now
    rank, world, dev = 0, 1, torch.device("cpu")
    if device is not None:
        rank, world, dev = setup_distributed(functools.reduce(getattr, device.split("."), p), device)
    # checkpoints.remote (off by default): the newest remote checkpoint where there is no local one, and
    # every new one uploaded, by a helper process (vlmpipe/ops/checkpoint_sync.py); None when off.
    sync = checkpoint_sync.start(name, everything.checkpoints, main=rank == 0)
    seed_everything(p.seed)
    unused = {f"{k}.{u}" for k, cls in sections.items() for u in getattr(cls, "UNUSED", {})}
    logged = {k: v for k, v in flatten({k: to_dict(getattr(p, k)) for k in sections}).items() if k not in unused}
    logged.update({k: getattr(p, k) for k in top})
    try:
        with stage_run(name, logged, enabled=rank == 0, model=model) as run:
            yield Stage(name, p, run, rank, world, dev)
        checkpoint_sync.finish(sync)  # the last checkpoint on the remote, or one warning line
        if rank == 0:
            logging.getLogger(name).info("%s done in %.0fs%s", name, time.perf_counter() - t0,
                                         f" ({world} ranks)" if world > 1 else "")
    finally:
        checkpoint_sync.finish(sync)  # after a failure too (a no-op once finished)
        if device is not None:
            shutdown_distributed()
