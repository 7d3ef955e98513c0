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
- Attention scores and their weighted sum: ``4 * layers * d_model * T`` per token forward, three
  times that with backward (nanoGPT's ``12 L d T``, counting the causal half as computed).
- The projector MLP: ``6P`` per sample (it runs once per image, not per token).
- A convolution: ``2 * k_h * k_w * C_in / groups * C_out * H_out * W_out`` per image forward; the
  image tower trains, so three times that (the first layer's input gradient is counted though not
  needed: under 1 %).

``tests/test_flops.py`` checks these against torch's own count of the executed matmuls and
convolutions (``torch.utils.flop_counter``) on small models.
"""
from __future__ import annotations

import functools

import logging
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

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

    n_all: int        # matmul weight entries applied per token
    n_trainable: int  # of which train
    layers: int       # attention layers (0: none)
    d_model: int

    @classmethod
    def of(cls, module: nn.Module, layers: int = 0, d_model: int = 0) -> "TransformerCost":
        w = _matmul_weights(module)
        return cls(sum(n for n, _ in w), sum(n for n, t in w if t), layers, d_model)

    @classmethod
    def of_hf(cls, lm: nn.Module) -> "TransformerCost":
        cfg = lm.config
        return cls.of(lm, int(cfg.num_hidden_layers), int(cfg.hidden_size))

    def train_flops(self, batch: int, seq: int, input_grad: bool = True) -> int:
        """FLOPs of one forward + backward over ``batch`` rows of ``seq`` positions. ``input_grad``:
        gradients flow through the stack (something in or before it trains besides its last layers)."""
        per_token = 2 * self.n_all + (2 * self.n_all if input_grad else 0) + 2 * self.n_trainable
        attention = 4 * self.layers * self.d_model * seq * (3 if input_grad else 1)
        return batch * seq * (per_token + attention)


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

_cpu_peak_cache: dict[tuple[torch.dtype, int], float] = {}


def measured_cpu_peak(dtype: torch.dtype = torch.float32, seconds: float = 0.3) -> float:
    """FLOP/s of a square GEMM on this CPU with torch's current threads: what a matmul reaches here,
    the best of a few short runs (a measured ceiling, not the datasheet peak a GPU gets)."""
    key = (dtype, torch.get_num_threads())
    if key not in _cpu_peak_cache:
        n = 1024
        # Its own generator: measured mid-training (at the first logged step), a draw from the global RNG
        # would shift every later dropout mask, so a model would depend on whether a peak was measured
        # earlier in the same process (a resumed run, a stage that trains twice).
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, dtype=dtype, generator=g), torch.randn(n, n, dtype=dtype, generator=g)
        a @ b  # warm-up: thread pool and kernel selection
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
        _cpu_peak_cache[key] = best
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
    dtype = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
    return measured_cpu_peak(dtype), f"measured {str(dtype).replace('torch.', '')} GEMM, {torch.get_num_threads()} threads"


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
