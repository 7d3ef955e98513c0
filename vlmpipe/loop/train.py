"""THE training loop, shared by train_siglip, train_phi2_qlora and train_gpt2_captioner.

One visible loop in ``fit`` (nanoGPT-style), not a framework. A stage builds a
``TrainTask`` and calls::

    result = fit(task, params.siglip.train, seed=params.seed,
                 ckpt_dir=Path("models/checkpoints/siglip"), report_dir=Path("reports/siglip"),
                 identity={"siglip": to_dict(params.siglip), "seed": params.seed, "data": data_hash},
                 run=run)  # -> FitResult(metrics, samples_per_s, tokens_per_s, steps, ...)

Contract:

- ``task.model.forward(batch: dict) -> dict(loss=Tensor, samples=int, tokens=int|Tensor)``;
  ``tokens`` may be 0 (then tokens/s is not shown) or a device tensor (read at the next flush, not
  per step). A model with ``train_flops(batch) -> int`` (the FLOPs of forward + backward,
  ``vlmpipe/core/flops.py``) gets MFU reported. Only parameters with
  ``requires_grad`` are optimized and checkpointed (plus persistent buffers,
  e.g. BatchNorm statistics, which training also changes).
- ``cfg.batch_size`` is the GLOBAL number of samples per optimizer step. Each
  of the W ranks (``torchrun``) gets B / W of them, in ``cfg.grad_accum``
  micro-batches of B / (W * grad_accum): changing W or grad_accum does not
  change what one step sees. A last partial batch of an epoch is dropped.
- Data order: a permutation per epoch from ``torch.Generator`` seeded with
  ``seed + epoch``, so the position (epoch, batch) fully determines the next
  batch and a resumed run sees the same batches. A dataset with ``set_epoch``
  gets it called, in the process that reads it, before its first item of an
  epoch (for per-epoch choices such as which of an image's texts to use, made
  deterministically from seed, epoch and index). ``cfg.num_workers`` > 0 reads
  batches in persistent worker processes (pinned memory on CUDA).
- Speed apart from quality: ``report_dir/metrics.json`` holds the last evaluation;
  ``report_dir/../speed/<report_dir name>.json`` samples/s, tokens/s, model TFLOP/s per device
  and MFU of this process's steps (``reports/siglip`` → ``reports/speed/siglip.json``; after a
  resume, of the steps since). Nothing DVC hashes records wall time: checkpoints and curves
  come out byte-identical from two runs on the same kind of CPU.
  The host reads losses from the device every ``log_every`` steps, not per step.
- ``task.param_groups(model, lr)`` may return optimizer groups (group 0 is the
  one whose lr is logged); default: ``decay_groups``, weight decay on matrices only.
- ``task.evaluate(model, epoch)`` runs after every epoch on rank 0, on the
  unwrapped model in eval mode under ``no_grad``; the RNG state is saved and
  restored around it, so evaluating never changes the training trajectory.
- Checkpoints: ``ckpt_dir/step_XXXXXXXX/`` every ``cfg.checkpoint_every``
  optimizer steps and at the end; fit resumes from the latest automatically.
  A checkpoint whose ``identity`` (+ seed, world size, and a hash of the code:
  the vlmpipe sources and the running script) differs is reported with the keys
  that changed, deleted, and training starts fresh. The checkpoint directories
  are ``persist: true`` in dvc.yaml so a killed stage resumes; without the code
  hash, a stage that DVC reruns because its code changed would "resume" the old
  run's final checkpoint and train nothing.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vlmpipe.core.errors import UserError
from vlmpipe.core.io import atomic_path, write_json
from vlmpipe.core.params import TrainParams, flatten
from vlmpipe.core.runtime import barrier, resolve_precision, setup_distributed

log = logging.getLogger(__name__)


@dataclass
class TrainTask:
    name: str
    model: nn.Module
    train_data: Dataset
    collate: Callable[[list], dict]
    param_groups: Callable[[nn.Module, float], list[dict]] | None = None
    evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None
    optimizer: str = "adamw"  # or "paged_adamw" (bitsandbytes PagedAdamW32bit, CUDA only)


@dataclass
class FitResult:
    metrics: dict[str, float]  # the last evaluation's metrics ({} without task.evaluate)
    samples_per_s: float
    tokens_per_s: float
    steps: int
    train_seconds: float = 0.0
    resumed_from_step: int = 0
    final_loss: float = math.nan  # the last optimizer step's training loss
    speed: dict = field(default_factory=dict)  # what report_dir/speed.json holds (throughput, MFU)


class _AllReduceWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g)  # every rank's output depends on our input
        return g


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the global batch on any backend.

    torch's SyncBatchNorm is CUDA-only; without this, W ranks would each
    normalise B/W samples and a DDP run would not match a 1-process run.
    """

    def _check_input_dim(self, x):
        pass

    def forward(self, x):
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        n = _AllReduceWithGrad.apply(torch.tensor(float(x.numel() // x.shape[1])))
        mean = _AllReduceWithGrad.apply(x.sum(dims)) / n
        var = _AllReduceWithGrad.apply(((x - mean.view(shape)) ** 2).sum(dims)) / n  # two-pass, like BN
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.detach(), m)
            self.running_var.lerp_(var.detach() * n / (n - 1), m)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def _sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)
            new.load_state_dict(child.state_dict())
            if child.affine:  # keep the very Parameter objects (optimizer groups may hold them)
                new.weight, new.bias = child.weight, child.bias
            new.train(child.training)
            setattr(module, name, new)
        else:
            _sync_batchnorm(child, device)
    return module


# --------------------------------------------------------------------- state


def _rng_state(device: torch.device) -> dict:
    ver, key, gauss = random.getstate()
    np_state = np.random.get_state()
    s = {"python": [ver, list(key), gauss], "torch": torch.get_rng_state(),
         "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def _set_rng_state(s: dict, device: torch.device) -> None:
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    np.random.set_state((s["numpy"][0], s["numpy"][1].numpy().astype(np.uint32), *s["numpy"][2:]))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], device)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters + persistent buffers (BatchNorm statistics change during training too)."""
    out = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for mod_name, mod in model.named_modules():
        for b_name, b in mod.named_buffers(recurse=False):
            if b is not None and b_name not in mod._non_persistent_buffers_set:
                out[f"{mod_name}.{b_name}" if mod_name else b_name] = b
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def _diff(old: dict, new: dict) -> list[str]:
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in ckpt_dir.glob("step_*") if (p / "state.pt").exists())


def _save_checkpoint(ckpt_dir: Path, model: nn.Module, state: dict, identity: dict) -> None:
    final = ckpt_dir / f"step_{state['step']:08d}"
    with atomic_path(final) as tmp:  # a kill mid-write leaves only a hidden temp dir
        tmp.mkdir()
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(state, tmp / "state.pt")
        (tmp / "identity.json").write_text(json.dumps(identity, indent=1, sort_keys=True))
    for old in _checkpoints(ckpt_dir):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def _set_aside(ckpt: Path, why: str, main: bool) -> None:
    """Move a checkpoint that cannot be resumed out of the way (kept for a look, never read again)."""
    if main:
        dest = ckpt.with_name(f"damaged-{ckpt.name}")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(ckpt, dest)
        log.warning("checkpoint %s cannot be resumed (%s); moved it to %s and starting fresh (delete it when "
                    "you have looked)", ckpt, why, dest)
    barrier()


def _read_checkpoint(ckpt: Path, model: nn.Module) -> tuple[dict, dict, dict]:
    """(identity, weights, state) of one checkpoint; ValueError saying what is wrong when it is damaged."""
    try:
        identity = json.loads((ckpt / "identity.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"identity.json: {type(e).__name__}: {e}") from None
    try:
        weights = load_file(str(ckpt / "trainable.safetensors"))
    except Exception as e:  # noqa: BLE001 - safetensors reports truncation and garbage in several types
        raise ValueError(f"trainable.safetensors: {str(e).splitlines()[0][:200] or type(e).__name__}") from None
    try:
        state = torch.load(ckpt / "state.pt", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated zip or pickle: RuntimeError, EOFError, UnpicklingError, ...
        raise ValueError(f"state.pt: {str(e).splitlines()[0][:200] or type(e).__name__}") from None
    if not isinstance(identity, dict) or not isinstance(state, dict) or not {"step", "optimizer", "rng"} <= set(state):
        raise ValueError("identity.json or state.pt does not hold a vlmpipe checkpoint")
    return identity, weights, state


def _misfit(weights: dict, model: nn.Module) -> str:
    """Why ``weights`` do not fit ``model`` ('' when they do)."""
    wrong = [k for k, v in trainable_state(model).items() if k not in weights or weights[k].shape != v.shape]
    return f"trainable.safetensors lacks or misshapes {wrong[:3]}" if wrong else ""


def _load_checkpoint(ckpt_dir: Path, identity: dict, model: nn.Module, main: bool) -> dict | None:
    """Load the latest matching checkpoint's weights into ``model``; return its state dict.

    A checkpoint made with other settings is deleted (with the keys that changed); a damaged one
    (truncated file, corrupt JSON, weights that do not fit the model) is set aside as
    ``damaged-step_*`` beside it. Either way training starts fresh, with a warning saying why.
    """
    ckpts = _checkpoints(ckpt_dir)
    if not ckpts:
        return None
    latest = ckpts[-1]
    try:
        saved, weights, state = _read_checkpoint(latest, model)
    except ValueError as e:
        _set_aside(latest, str(e), main)
        return _load_checkpoint(ckpt_dir, identity, model, main)  # an older one may still be whole
    if saved != identity:  # before the shapes: other code or settings may shape the model otherwise
        if main:
            log.warning("checkpoint %s was made with different settings (%s); starting fresh and deleting it",
                        latest, "; ".join(_diff(saved, identity)[:10]))
        barrier()  # every rank has decided before rank 0 deletes
        if main:
            for p in ckpts:
                shutil.rmtree(p, ignore_errors=True)
        return None
    misfit = _misfit(weights, model)
    if misfit:  # the same settings and code, yet other shapes: damaged
        _set_aside(latest, misfit, main)
        return _load_checkpoint(ckpt_dir, identity, model, main)
    model.load_state_dict(weights, strict=False)
    if main:
        log.info("resuming %s from %s (step %d)", ckpt_dir.name, latest, state["step"])
    return state


def fingerprint(*paths: str | os.PathLike) -> str:
    """sha256 over the files under ``paths`` (names and bytes): put it in a stage's checkpoint
    identity so a checkpoint trained on other data is never resumed."""
    h = hashlib.sha256()
    for root in map(Path, paths):
        for f in sorted([root] if root.is_file() else (p for p in root.rglob("*") if p.is_file())):
            h.update(str(f.relative_to(root.parent)).encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def code_fingerprint(dvc_yaml: str | os.PathLike = "dvc.yaml") -> str:
    """sha256 over the code the running stage depends on: the deps of its ``dvc.yaml`` entry that no
    stage writes and that are not the user's inputs (its script, the vlmpipe folders it lists, the
    pinned requirements). Editing code outside them (the CLI, tracking) leaves its checkpoints
    resumable, as it leaves ``dvc status`` clean. Outside a stage (a test, a notebook): the vlmpipe
    package's sources and the running script."""
    import __main__

    script = getattr(__main__, "__file__", None)
    paths = _stage_code(Path(dvc_yaml), script) if script else None
    if paths is None:
        paths = sorted(Path(__file__).resolve().parents[1].rglob("*.py"))
        if script and Path(script).is_file():
            paths.append(Path(script).resolve())
    h = hashlib.sha256()
    for root in paths:
        files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
        for f in files:  # by name, not location: a moved checkout resumes its own checkpoints
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _stage_code(dvc_yaml: Path, script: str) -> list[Path] | None:
    """The code deps of the ``dvc_yaml`` stage whose command runs ``script``, or None when none does."""
    import yaml

    try:
        stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
        rel = Path(script).resolve().relative_to(dvc_yaml.resolve().parent).as_posix()
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None
    outs = [next(iter(o)) if isinstance(o, dict) else o for s in stages.values() for o in s.get("outs", [])]
    for spec in stages.values():
        if spec.get("cmd", "").split()[-1:] == [rel]:
            deps = [d for d in spec.get("deps", []) if not d.startswith("inputs/")
                    and not any(d == o or d.startswith(o.rstrip("/") + "/") for o in outs)]
            return [Path(d) for d in deps]
    return None


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


# --------------------------------------------------------------------- the loop


def decay_groups(params: Sequence[nn.Parameter], lr: float, wd: float) -> list[dict]:
    """Two optimizer groups of ``params`` at ``lr``: the matrices (weights of linears, convs and
    embeddings) with weight decay ``wd``, the rest (biases, norms, scalars) without, as nanoGPT.
    The loop's default groups, and the building block of a stage's own."""
    return [{"params": [p for p in params if p.dim() >= 2], "lr": lr, "weight_decay": wd},
            {"params": [p for p in params if p.dim() < 2], "lr": lr, "weight_decay": 0.0}]


def _optimizer(kind: str, groups: list[dict], cfg: TrainParams, device: torch.device) -> torch.optim.Optimizer:
    if kind == "paged_adamw":
        if device.type == "cuda":
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW32bit(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        log.info("paged_adamw needs CUDA; using torch AdamW on %s", device)
    elif kind != "adamw":
        raise ValueError(f"unknown optimizer {kind!r}")
    # Fused: one kernel for all parameters instead of several per tensor (CUDA; on a CPU the
    # default implementation keeps the offline default's numbers).
    fused = bool(cfg.fused_adamw and device.type == "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def _cosine_with_warmup(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:  # multiplier on each group's lr for optimizer step ``step`` (0-based)
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def _epoch_batches(n: int, cfg: TrainParams, seed: int, epoch: int, first: int, rank: int, world: int) -> list[list[int]]:
    """This rank's micro-batches (as index lists) from global batch ``first`` to the end of ``epoch``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    B, per_rank = cfg.batch_size, cfg.batch_size // world
    micro = per_rank // cfg.grad_accum
    out = []
    for b in range(first, n // B):
        shard = order[b * B + rank * per_rank: b * B + (rank + 1) * per_rank]
        out += [shard[i * micro:(i + 1) * micro] for i in range(cfg.grad_accum)]
    return out


class _EpochBatches:
    """The loader's batch sampler: the micro-batches of the epoch (and start) last set, as
    ``(epoch, index)`` keys. One loader serves the whole run, so its workers persist."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def set(self, epoch: int, batches: list[list[int]]) -> None:
        self.batches = [[(epoch, i) for i in b] for b in batches]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _EpochIndexed(Dataset):
    """``data[(epoch, i)]`` → ``data[i]`` after ``data.set_epoch(epoch)`` when the epoch changed.

    A dataset with per-epoch choices (which of an image's texts) must see the epoch in the process
    that reads it: a persistent worker holds its own copy, which a ``set_epoch`` in the main process
    would never reach.
    """

    def __init__(self, data: Dataset) -> None:
        self.data, self.epoch = data, None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        if epoch != self.epoch and hasattr(self.data, "set_epoch"):
            self.data.set_epoch(epoch)
        self.epoch = epoch
        return self.data[i]


def mfu_text(speed: dict) -> str:
    """``12.3% of 989 TFLOP/s (H100 ... datasheet)`` for logs; ``n/a`` without a FLOPs formula or peak."""
    if speed.get("mfu") is None:
        return "n/a"
    return f"{100 * speed['mfu']:.1f}% of {speed['peak_tflops']:g} TFLOP/s ({speed['peak_source']})"


def _speed(seen: dict, world: int, device: torch.device, amp_dtype: torch.dtype) -> dict:
    """Throughput and MFU over ``seen`` (summed over ranks): FLOPs per second per device over its peak."""
    from vlmpipe.core import flops as F

    sec = max(seen["seconds"], 1e-9)
    out = {"samples_per_s": round(seen["samples"] / sec, 2), "train_seconds": round(seen["seconds"], 2),
           "world_size": world, "device": F.device_name(device)}
    if seen["tokens"]:
        out["tokens_per_s"] = round(seen["tokens"] / sec, 2)
    if seen["flops"]:
        peak, source = F.peak_flops(device, amp_dtype)
        achieved = seen["flops"] / sec / world
        out.update(model_tflops_per_device=round(achieved / 1e12, 4), peak_tflops=round(peak / 1e12, 3),
                   peak_source=source, mfu=round(achieved / peak, 4) if peak == peak else None)
    return out


def fit(task: TrainTask, cfg: TrainParams, *, seed: int, ckpt_dir: Path, report_dir: Path,
        identity: dict, run: Any = None) -> FitResult:
    ckpt_dir, report_dir = Path(ckpt_dir), Path(report_dir)
    speed_file = report_dir.parent / "speed" / f"{report_dir.name}.json"  # reports/siglip -> reports/speed/siglip.json
    rank, world, device = setup_distributed(cfg.device)
    main = rank == 0
    identity = json.loads(json.dumps({**identity, "seed": seed, "world_size": world, "code": code_fingerprint()},
                                     sort_keys=True, default=str))
    n, B, accum = len(task.train_data), cfg.batch_size, cfg.grad_accum
    if B % (world * accum):
        raise UserError(f"train.batch_size: {B} is not divisible by world size x grad_accum = {world} x {accum}")
    if n < B:
        raise UserError(f"train.batch_size: {B} is larger than the training set of {task.name} ({n} samples)")
    steps_per_epoch = n // B
    total = steps_per_epoch * cfg.epochs

    model = task.model.to(device)
    if world > 1:
        _sync_batchnorm(model, device)  # BatchNorm over the global batch, as in a 1-process run
    params = [p for p in model.parameters() if p.requires_grad]
    groups = task.param_groups(model, cfg.lr) if task.param_groups else decay_groups(params, cfg.lr, cfg.weight_decay)
    if {id(p) for g in groups for p in g["params"]} != {id(p) for p in params}:
        raise ValueError(f"{task.name}: param_groups must cover exactly the trainable parameters")
    optimizer = _optimizer(task.optimizer, groups, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_with_warmup(round(cfg.warmup_ratio * total), total))

    # Resume: weights, optimizer, schedule, RNG and data position from the latest checkpoint.
    if main:
        for stale in ckpt_dir.glob(".step_*.tmp"):  # a write killed before its rename
            shutil.rmtree(stale, ignore_errors=True)
    ck = _load_checkpoint(ckpt_dir, identity, model, main) if ckpt_dir.exists() else None
    start, train_rows, val_rows, seen = 0, [], [], {"seconds": 0.0, "samples": 0, "tokens": 0, "flops": 0}
    if ck is not None:
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        _set_rng_state(ck["rng"][rank], device)
        start, train_rows, val_rows = ck["step"], ck["train_rows"], ck["val_rows"]

    # DDP all-reduces (averages) gradients during backward; find_unused_parameters=False: all trainable params are used.
    # (On CPU, 1x1 convolution weight gradients differ from their weights only in the strides of size-1
    # dimensions; DDP warns about that on every run although nothing is wrong.)
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    step_fn = torch.compile(ddp) if cfg.compile else ddp  # compiles on the first step; DDP-aware
    # bf16 autocast where cfg.precision says so (auto: on CUDA; no GradScaler needed: bf16 has fp32's
    # exponent range); plain fp32 otherwise.
    amp_dtype = resolve_precision(cfg.precision, device)
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype != torch.float32 \
        else contextlib.nullcontext
    if main and device.type == "cpu":
        from vlmpipe.core.flops import peak_flops

        peak_flops(device, amp_dtype)  # calibrates this CPU once (kept per machine), before any step runs
    # The host waits for the device only every `log_every` steps (and at epoch ends and checkpoints):
    # losses stay on the device until then, so a GPU never idles between steps for a print.
    log_every = max(1, total // 200)  # MLflow gets <= ~200 train points; the CSV gets every step
    if device.type == "cuda":  # TF32 tensor cores for the matmuls and convolutions autocast leaves in fp32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    sampler = _EpochBatches()
    loader = DataLoader(_EpochIndexed(task.train_data), batch_sampler=sampler, collate_fn=task.collate,
                        num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                        pin_memory=device.type == "cuda")
    bar = tqdm(total=total, initial=start, desc=task.name, disable=not main, dynamic_ncols=True, mininterval=1.0)
    pending: list[tuple[dict, torch.Tensor, Any]] = []  # (row without loss, loss on device, tokens)
    clock = {"t": time.perf_counter(), "samples": 0, "flops": 0}  # the interval since the last flush

    def flush() -> None:
        """Bring the pending steps' losses to the host: curve rows, progress bar, MLflow, timing."""
        nonlocal seen
        if not pending:
            return
        vals = torch.stack([torch.stack([torch.as_tensor(l, device=device).float(),
                                         torch.as_tensor(t, device=device).float()]) for _, l, t in pending])
        if world > 1:
            dist.all_reduce(vals)  # the logged loss is the global batch's; tokens are totals
        vals = vals.tolist()  # the one host-device synchronisation of the interval
        dt = time.perf_counter() - clock["t"]
        tokens = int(sum(t for _, t in vals))
        samples = clock["samples"] * world
        seen = {"seconds": seen["seconds"] + dt, "samples": seen["samples"] + samples,
                "tokens": seen["tokens"] + tokens, "flops": seen["flops"] + clock["flops"] * world}
        for (row, _, _), (loss, _) in zip(pending, vals):
            train_rows.append({"step": row["step"], "epoch": row["epoch"], "loss": loss / world, "lr": row["lr"]})
        last = train_rows[-1]
        speed = {"samples_per_s": samples / dt, "tokens_per_s": tokens / dt}
        post = {"loss": f"{last['loss']:.4f}", "lr": f"{last['lr']:.2e}", "samples/s": f"{samples / dt:.0f}"}
        if tokens:
            post["tokens/s"] = f"{tokens / dt:.0f}"
        if clock["flops"] and main:
            sp = _speed({"seconds": dt, "samples": samples, "tokens": tokens, "flops": clock["flops"] * world},
                        world, device, amp_dtype)
            if sp.get("mfu") is not None:
                speed["mfu"] = sp["mfu"]
                post["MFU"] = f"{100 * sp['mfu']:.1f}%"
        bar.set_postfix(post, refresh=False)
        bar.update(len(pending))
        if run is not None and main:
            run.log_metrics({"train/loss": last["loss"], "train/lr": last["lr"],
                             **{f"speed/{k}": v for k, v in speed.items()}}, step=last["step"])
        pending.clear()
        restart_clock()

    def restart_clock() -> None:
        clock.update(t=time.perf_counter(), samples=0, flops=0)

    flops_of = getattr(task.model, "train_flops", None)  # the model's FLOPs formula, for MFU
    model.train()
    for step in range(start, total):
        epoch, b = divmod(step, steps_per_epoch)
        if step == start or b == 0:  # the epoch's batches from its start, or from the resume point
            sampler.set(epoch, _epoch_batches(n, cfg, seed, epoch, b, rank, world))
            loader.generator = torch.Generator().manual_seed(seed + epoch)  # worker seeds; not the global RNG
            batches = iter(loader)

        loss_sum, samples, tokens, step_flops = None, 0, 0, 0
        for micro in range(accum):
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(batches).items()}
            # Only the last micro-step needs DDP's gradient all-reduce; the others just accumulate locally.
            sync = contextlib.nullcontext() if (world == 1 or micro == accum - 1) else ddp.no_sync()
            with sync:
                with amp():
                    out = step_fn(batch)
                (out["loss"] / accum).backward()  # / accum: the step's gradient is the mean over micro-batches
            part = out["loss"].detach().float() / accum
            loss_sum = part if loss_sum is None else loss_sum + part
            samples, tokens = samples + int(out["samples"]), tokens + out["tokens"]  # tokens may stay on device
            step_flops += flops_of(batch) if flops_of else 0
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        clock["samples"] += samples
        clock["flops"] += step_flops
        pending.append(({"step": step + 1, "epoch": round(epoch + (b + 1) / steps_per_epoch, 4), "lr": lr},
                        loss_sum, tokens))

        end_of_epoch = b + 1 == steps_per_epoch
        checkpoint_now = bool(cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or step + 1 == total
        if (step + 1) % log_every == 0 or end_of_epoch or checkpoint_now:
            flush()
        if end_of_epoch and task.evaluate is not None and main:
            metrics = _evaluate(task, model, epoch + 1, device, amp)
            val_rows.append({"epoch": epoch + 1, "step": step + 1, **metrics})
            log.info("%s epoch %d/%d step %d: loss %.4f | %s", task.name, epoch + 1, cfg.epochs, step + 1,
                     train_rows[-1]["loss"], " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if run is not None:
                run.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step=step + 1)
        if end_of_epoch:
            barrier()  # other ranks wait while rank 0 evaluates

        if checkpoint_now:
            rngs = [_rng_state(device)]
            if world > 1:  # each rank's RNG state, so every rank resumes its own stream
                rngs = [None] * world
                dist.all_gather_object(rngs, _rng_state(device))
            if main:
                _save_checkpoint(ckpt_dir, model, {
                    "step": step + 1, "epoch": epoch, "batch_in_epoch": b + 1, "rng": rngs,
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "train_rows": train_rows, "val_rows": val_rows}, identity)
            barrier()
        if main and (end_of_epoch or checkpoint_now):  # the curve files, consistent with the checkpoint
            _write_csv(report_dir / "train_curve.csv", train_rows)
            _write_csv(report_dir / "val_curve.csv", val_rows)
        if end_of_epoch or checkpoint_now:
            restart_clock()  # evaluation and checkpoint writing are not training time
    bar.close()

    final = {k: v for k, v in (val_rows[-1] if val_rows else {}).items() if k not in ("epoch", "step")}
    speed = {"stage": task.name, **_speed(seen, world, device, amp_dtype)} if main else {}
    sec = max(seen["seconds"], 1e-9)
    result = FitResult(metrics=final, samples_per_s=seen["samples"] / sec, tokens_per_s=seen["tokens"] / sec,
                       steps=total, train_seconds=seen["seconds"], resumed_from_step=start,
                       final_loss=train_rows[-1]["loss"] if train_rows else math.nan, speed=speed)
    if main:
        _write_csv(report_dir / "train_curve.csv", train_rows)
        _write_csv(report_dir / "val_curve.csv", val_rows)
        quality = {**final, "steps": total, "epochs": cfg.epochs}
        write_json(report_dir / "metrics.json", quality)
        # Speed apart from quality, in reports/speed/: `dvc metrics diff --targets` can leave it out.
        write_json(speed_file, speed)
        if run is not None:
            run.log_metrics({f"final/{k}": v for k, v in quality.items()})
            run.log_metrics({f"speed/{k}": v for k, v in speed.items() if isinstance(v, (int, float))})
            for f in (report_dir / "train_curve.csv", report_dir / "val_curve.csv", report_dir / "metrics.json", speed_file):
                run.log_artifact(f)
    return result


def _evaluate(task: TrainTask, model: nn.Module, epoch: int, device: torch.device, amp) -> dict[str, float]:
    rng = _rng_state(device)  # evaluation may draw random numbers; training must not notice
    model.eval()
    try:
        with torch.no_grad(), amp():
            return {k: float(v) for k, v in task.evaluate(model, epoch).items()}
    finally:
        _set_rng_state(rng, device)
        model.train()
