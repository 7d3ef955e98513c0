"""Model FLOPs per training step and the device's peak: what MFU (model FLOPs utilisation) is made of.

MFU = model FLOPs per second / the device's peak FLOP/s (nanoGPT, PaLM appendix B). Model FLOPs
count the arithmetic the model needs, not what was executed: gradient-checkpointing recomputation
and padding beyond the batch's longest row are not counted; elementwise work, norms and the loss are
left out (a few percent). A multiply-add is 2 FLOPs.

The model, written down:

- A matmul weight of ``n`` entries applied to one token (or one image position) costs ``2n`` forward.
  Backward costs ``2n`` for the gradient of its input, needed whenever anything before it trains
  (always in the prefix LMs: the projector sits before the LM), and ``2n`` for its own gradient, only
  when it trains. So a trained transformer costs ``6N`` per token (nanoGPT), a frozen one that
  gradients flow through (the 4-bit Phi-2 under LoRA) ``4N + 2N_lora``, and a frozen one nothing
  before it trains (the hub text encoder of SigLIP) ``2N``.
- An LM's output head (the vocabulary projection) counts on the positions it runs on: the prefix
  LMs run it on the loss's target positions only (``vlmpipe/models/lm/prefix_lm.py``), a plain LM
  on every position.
- Attention scores and their weighted sum: ``4 * layers * d_model * T`` per token forward, three
  times that with backward (nanoGPT's ``12 L d T``, counting the causal half as computed).
- The projector MLP: ``6P`` per image region (it runs once per region of an image, not per token).
- A convolution: ``2 * k_h * k_w * C_in / groups * C_out * H_out * W_out`` per image forward; the
  image tower trains, so three times that (the first layer's input gradient is counted though not
  needed: under 1 %).

``tests/test_flops.py`` checks these against torch's own count of the executed matmuls and
convolutions (``torch.utils.flop_counter``) on small models.
"""
from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlmpipe.core.io import atomic_path

log = logging.getLogger(__name__)


def _matmul_weights(module: nn.Module) -> list[tuple[int, bool]]:
    """(entries, trains) of every matmul weight applied once per token: Linear (also 4-bit and
    LoRA's), GPT-2's Conv1D, MultiheadAttention's packed input projection. A tied LM head counts:
    it is applied, whatever it shares."""
    out = []
    for m in module.modules():
        if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            out.append((m.in_proj_weight.numel(), m.in_proj_weight.requires_grad))
        w = getattr(m, "weight", None)
        if w is None:
            continue
        if isinstance(m, nn.Linear):  # bitsandbytes' Linear4bit packs its weight: count the logical shape
            out.append((m.in_features * m.out_features, w.requires_grad))
        elif type(m).__name__ == "Conv1D" and w.dim() == 2:  # transformers' GPT-2 linear
            out.append((w.numel(), w.requires_grad))
    return out


@dataclass(frozen=True)
class TransformerCost:
    """Per-token cost constants of a transformer (or any stack of matmuls applied per token)."""

    n_all: int        # matmul weight entries applied per token, the output head's included
    n_trainable: int  # of which train
    layers: int       # attention layers (0: none)
    d_model: int
    n_head: int = 0   # of n_all, the output head's (an LM's vocabulary projection)
    head_trains: bool = False

    @classmethod
    def of(cls, module: nn.Module, layers: int = 0, d_model: int = 0, head: nn.Module | None = None) -> "TransformerCost":
        w = _matmul_weights(module)
        h = _matmul_weights(head) if head is not None else []
        return cls(sum(n for n, _ in w), sum(n for n, t in w if t), layers, d_model,
                   sum(n for n, _ in h), any(t for _, t in h))

    @classmethod
    def of_hf(cls, lm: nn.Module) -> "TransformerCost":
        cfg = lm.config
        return cls.of(lm, int(cfg.num_hidden_layers), int(cfg.hidden_size), lm.get_output_embeddings())

    def train_flops(self, batch: int, seq: int, input_grad: bool = True, head_rows: int | None = None) -> int:
        """FLOPs of one forward + backward over ``batch`` rows of ``seq`` positions. ``input_grad``:
        gradients flow through the stack (something in or before it trains besides its last layers).
        ``head_rows``: the output head runs on that many positions only (the loss's targets); None:
        on every position."""
        def per_token(n_all: int, n_trainable: int) -> int:
            return 2 * n_all + (2 * n_all if input_grad else 0) + 2 * n_trainable

        attention = 4 * self.layers * self.d_model * seq * (3 if input_grad else 1)
        if head_rows is None:
            return batch * seq * (per_token(self.n_all, self.n_trainable) + attention)
        head_trainable = self.n_head if self.head_trains else 0
        body = per_token(self.n_all - self.n_head, self.n_trainable - head_trainable)
        return batch * seq * (body + attention) + head_rows * per_token(self.n_head, head_trainable)


def mlp_train_flops(module: nn.Module, batch: int) -> int:
    """A trained MLP applied once per sample: 6 FLOPs per weight entry."""
    return 6 * batch * sum(n for n, _ in _matmul_weights(module))


def conv_net_forward_flops(module: nn.Module, example: torch.Tensor) -> int:
    """Forward FLOPs per input of a convolutional network, from one forward of ``example`` (batch 1):
    every Conv2d and Linear by its output size, as the docstring's formula says."""
    total = [0]

    def conv(m: nn.Conv2d, _inp, out):
        kh, kw = m.kernel_size
        total[0] += 2 * kh * kw * (m.in_channels // m.groups) * out[0].numel()

    def linear(m: nn.Linear, _inp, out):
        total[0] += 2 * m.in_features * out[0].numel()

    hooks = [m.register_forward_hook(conv if isinstance(m, nn.Conv2d) else linear)
             for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            module(example)
    finally:
        module.train(was_training)
        for h in hooks:
            h.remove()
    return total[0]


# --------------------------------------------------------------------- peak

# Dense peaks from the vendors' datasheets, TFLOP/s: (bf16 tensor core, tf32 tensor core, fp32 plain).
# Matched against torch.cuda.get_device_name in order (first match wins). A10G: AWS publishes no
# figure; NVIDIA's A10 datasheet values are used (the same GA102 chip). VLMPIPE_PEAK_TFLOPS overrides.
GPU_PEAK_TFLOPS: list[tuple[str, tuple[float, float, float]]] = [
    ("H200", (989.5, 494.7, 66.9)),
    ("H100 PCIe", (756.0, 378.0, 51.2)),
    ("H100", (989.5, 494.7, 66.9)),
    ("GH200", (989.5, 494.7, 66.9)),
    ("B200", (2250.0, 1100.0, 80.0)),
    ("A100", (312.0, 156.0, 19.5)),
    ("A10G", (125.0, 62.5, 31.2)),
    ("A10", (125.0, 62.5, 31.2)),
    ("L40S", (362.0, 183.0, 91.6)),
    ("L4", (121.0, 60.0, 30.3)),
    ("A6000", (154.8, 77.4, 38.7)),
    ("RTX 4090", (165.2, 82.6, 82.6)),
    ("V100", (125.0, 15.7, 15.7)),   # fp16 tensor cores (no bf16)
    ("T4", (65.0, 8.1, 8.1)),        # fp16 tensor cores (no bf16)
]

def peak_file() -> Path:
    """Where this machine's calibrated CPU peaks are kept: ``$VLMPIPE_PEAK_FILE`` or
    ``~/.cache/vlmpipe/cpu_peak.json``. Delete it to calibrate again (say, after a move to other hardware
    under the same CPU name)."""
    env = os.environ.get("VLMPIPE_PEAK_FILE")
    return Path(env) if env else Path.home() / ".cache" / "vlmpipe" / "cpu_peak.json"


def measure_cpu_gemm(dtype: torch.dtype = torch.float32, seconds: float = 1.5) -> float:
    """FLOP/s of the fastest of many short square GEMMs (sizes 512, 1024 and 2048) on this CPU with torch's
    current threads: what a matmul reaches here, a measured ceiling, not a datasheet peak."""
    # Its own generator: a draw from the global RNG would shift every later dropout mask, so a model
    # would depend on whether a peak was measured in the same process.
    g = torch.Generator().manual_seed(0)
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype, generator=g), torch.randn(n, n, dtype=dtype, generator=g)
        a @ b  # warm-up: thread pool and kernel selection
        deadline = time.perf_counter() + seconds / 3
        slowest = 0.0
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            a @ b
            dt = time.perf_counter() - t
            best, slowest = max(best, 2 * n**3 / dt), max(slowest, dt)
        if 8 * slowest > seconds / 3:  # the next size (8x the work) would overrun: a slow (emulated) precision
            break
    return best


_cpu_peak_cache: dict[str, tuple[float, str]] = {}


def calibrated_cpu_peak(dtype: torch.dtype = torch.float32) -> tuple[float, str]:
    """(FLOP/s, source) of this machine's CPU for ``dtype`` at torch's current thread count, measured once
    (``measure_cpu_gemm``) and kept in ``peak_file()``: every stage of a run, and every later run, divides
    by the same figure, so MFU compares across stages. Measured mid-run, a peak followed the machine's
    load of that moment (0.09 to 0.19 TFLOP/s within one run). The first process to need a figure
    measures it under a file lock; the others wait and read it."""
    threads = torch.get_num_threads()
    key = f"{_cpu_name()} | {str(dtype).replace('torch.', '')} | {threads} threads | torch {torch.__version__}"
    if key in _cpu_peak_cache:
        return _cpu_peak_cache[key]
    path = peak_file()
    what = f"{str(dtype).replace('torch.', '')} GEMM, {threads} threads"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                table = json.loads(path.read_text())
            except (OSError, ValueError):
                table = {}
            if key not in table:
                table[key] = {"flops": measure_cpu_gemm(dtype), "measured": time.strftime("%Y-%m-%d")}
                with atomic_path(path) as tmp:
                    tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
                log.info("calibrated this CPU: %.3f TFLOP/s (%s), kept in %s", table[key]["flops"] / 1e12, what, path)
            entry = table[key]
        _cpu_peak_cache[key] = float(entry["flops"]), f"calibrated {what}, {entry['measured']}"
    except OSError as e:  # a read-only home: measure in this process, and say that it was not kept
        log.warning("CPU peak not kept (%s: %s); measured for this process only", path, e.strerror or e)
        _cpu_peak_cache[key] = measure_cpu_gemm(dtype), f"measured {what}, this process only"
    return _cpu_peak_cache[key]


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s of one device for matmuls in ``dtype``, where the figure comes from)."""
    override = os.environ.get("VLMPIPE_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12, "VLMPIPE_PEAK_TFLOPS"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16, tf32, fp32) in GPU_PEAK_TFLOPS:
            if key.lower() in name.lower():
                if dtype in (torch.bfloat16, torch.float16):
                    return bf16 * 1e12, f"{name} datasheet, dense 16-bit"
                fast = torch.backends.cuda.matmul.allow_tf32
                return (tf32 if fast else fp32) * 1e12, f"{name} datasheet, {'tf32' if fast else 'fp32'}"
        return float("nan"), f"{name}: not in vlmpipe.core.flops.GPU_PEAK_TFLOPS (set VLMPIPE_PEAK_TFLOPS)"
    return calibrated_cpu_peak(dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


@functools.lru_cache(maxsize=None)
def _cpu_name() -> str:
    # Asked at every logged step: read /proc/cpuinfo once per process.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "CPU"
