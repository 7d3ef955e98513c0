"""A toy task for the training-loop tests: importable, and a script for the SIGKILL test.

    python tests/_toy_train.py CKPT_DIR REPORT_DIR OUT_WEIGHTS SLEEP_PER_ITEM [GRAD_ACCUM PLAIN]

(PLAIN=1: no BatchNorm, no dropout; also runs under torchrun.)

The model has what makes resuming hard: BatchNorm statistics (buffers),
dropout (RNG), a frozen layer (not checkpointed), and data whose values depend
on the epoch (``set_epoch``).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlmpipe.core.params import TrainParams
from vlmpipe.loop.train import TrainTask


class Toy(nn.Module):
    def __init__(self, bn: bool = True, dropout: float = 0.2) -> None:
        super().__init__()
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16) if bn else nn.Identity(), nn.ReLU(),
                                 nn.Dropout(dropout), nn.Linear(16, 1))

    def forward(self, batch: dict) -> dict:
        pred = self.net(self.frozen(batch["x"])).squeeze(-1)
        return {"loss": F.mse_loss(pred, batch["y"]), "samples": len(pred), "tokens": 3 * len(pred)}


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n: int = 96, sleep: float = 0.0, crash_after: int | None = None) -> None:
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.randn(8, generator=g) + 0.1 * torch.randn(n, generator=g)
        self.sleep, self.crash_after, self.calls, self.epoch = sleep, crash_after, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        self.calls += 1
        if self.crash_after is not None and self.calls > self.crash_after:
            raise RuntimeError("simulated crash")
        if self.sleep:
            time.sleep(self.sleep)
        return self.x[i], self.y[i] + 0.01 * self.epoch


def collate(items: list) -> dict:
    x, y = zip(*items)
    return {"x": torch.stack(x), "y": torch.stack(y)}


def make_task(bn: bool = True, dropout: float = 0.2, sleep: float = 0.0, crash_after: int | None = None,
              evaluate: bool = True) -> TrainTask:
    torch.manual_seed(0)
    model = Toy(bn, dropout)
    held = ToyData(n=32)

    def ev(m: nn.Module, epoch: int) -> dict:
        torch.rand(5)  # evaluation may use the RNG; the loop must hide that from training
        return {"val_mse": F.mse_loss(m.net(m.frozen(held.x)).squeeze(-1), held.y).item()}

    return TrainTask("toy", model, ToyData(sleep=sleep, crash_after=crash_after), collate,
                     evaluate=ev if evaluate else None)


def make_cfg(**kw) -> TrainParams:
    base = dict(epochs=4, batch_size=16, grad_accum=1, lr=1e-2, weight_decay=0.01, warmup_ratio=0.1,
                grad_clip=1.0, checkpoint_every=5, device="cpu")
    base.update(kw)
    return TrainParams(**base)


if __name__ == "__main__":
    import json

    from safetensors.torch import save_file

    from vlmpipe.loop.train import fit, trainable_state

    from vlmpipe.core.runtime import is_main_process, shutdown_distributed

    ckpt, report, out, sleep = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    accum, plain = (int(sys.argv[5]), sys.argv[6] == "1") if len(sys.argv) > 5 else (1, False)
    task = make_task(sleep=sleep, bn=not plain, dropout=0.0 if plain else 0.2)
    res = fit(task, make_cfg(grad_accum=accum), seed=0, ckpt_dir=Path(ckpt), report_dir=Path(report),
              identity={"toy": 1})
    if is_main_process():
        save_file(trainable_state(task.model), out)
        Path(out + ".json").write_text(json.dumps({"metrics": res.metrics, "resumed_from_step": res.resumed_from_step}))
    shutdown_distributed()
