"""Device choice, processes (one, or a torchrun group) and seeding, shared by every stage."""
from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch
import torch.distributed as dist


def resolve_device(name: str, key: str = "device") -> torch.device:
    """``auto`` → CUDA when present, else CPU. Asking for CUDA without one is an error naming ``key``."""
    from vlmpipe.core.errors import UserError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}: 'cuda' requested but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The matmul dtype a ``precision`` param means on ``device``.

    ``auto``: bf16 on a CUDA device that has it (autocast; no loss scaling needed, bf16 keeps
    fp32's exponent range), fp32 on a CPU, where bf16 is slower on most CPUs and changes the
    numerics the offline default was measured with. ``bf16`` / ``fp32`` force one; ``bf16`` on a
    CPU rehearses the CUDA path (tests do this).
    """
    if name == "bf16":
        return torch.bfloat16
    if name == "fp32":
        return torch.float32
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def setup_distributed(device_name: str = "auto", key: str = "device") -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun, joins the process group (nccl on CUDA, gloo on CPU)."""
    device = resolve_device(device_name, key)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            if dist.get_rank() != 0:  # rank-0-only logging: other ranks speak up only for problems
                logging.getLogger().setLevel(logging.WARNING)
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
