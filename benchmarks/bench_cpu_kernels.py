"""What the AVX2 kernel pin costs: the offline default's training steps with the pin and without.

    python benchmarks/bench_cpu_kernels.py [--rounds 3] [--steps 15]

``import vlmpipe`` pins PyTorch, oneDNN and MKL to their AVX2 code paths (see vlmpipe/__init__.py)
so runs reproduce across CPU kinds. This measures what that costs on the machine at hand: the same
workload — SigLIP training steps (the small ResNet tower + text tower, batch 128, 32 px) and tiny
GPT-2 captioner steps (batch 64) — in a fresh process per run, alternately with the pin and with
the CPU's widest kernels (``native``: AVX-512 / AMX where present), ``--rounds`` times each. It
prints the median seconds of each and their ratio; the CPU's name and flags come first.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIN = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")
NATIVE = {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "ALL", "MKL_ENABLE_INSTRUCTIONS": "AVX512",
          "MKL_CBWR": "AUTO"}


def workload(steps: int) -> float:
    """Seconds for ``steps`` SigLIP and ``steps`` captioner training steps (after one warm-up step each)."""
    sys.path.insert(0, str(REPO))
    import numpy as np
    import torch

    from vlmpipe.data.captions import CaptionDataset
    from vlmpipe.models.captioner import build_captioner
    from vlmpipe.models.siglip.model import build_siglip
    from vlmpipe.models.lm.tiny_lm import new_tiny_lm, save_tiny_lm
    from vlmpipe.siglip.params import SiglipParams
    from vlmpipe.core.params import TinyLMParams

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    texts = [f"a photo of a {c} {k}" for c in ("red", "blue", "green", "white") for k in ("circle", "star", "ring")]
    sig = build_siglip(SiglipParams(), texts)
    images = torch.from_numpy(rng.integers(0, 256, (128, 32, 32, 3), dtype=np.uint8))
    enc = sig.tokenize([texts[i % len(texts)] for i in range(128)])
    sig_batch = {"images": images, **enc, "text_ids": torch.arange(128) % len(texts)}
    lm, tok = new_tiny_lm("gpt2", TinyLMParams(), texts, 0)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-cpu-kernels-{os.getpid()}"
    save_tiny_lm(lm, tok, tmp, {})
    cap = build_captioner(tmp, encoder={"name": "x"}, feature_dim=512, regions=5, prefix_tokens=10, freeze_lm=False,
                          beam_size=1, max_caption_tokens=40)
    data = CaptionDataset(torch.randn(64, 5, 512).half(), [[texts[i % len(texts)]] for i in range(64)], cap.tokenizer, 40)
    cap_batch = cap.collate([data[i] for i in range(64)])
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (sig, cap)]

    def step(model, opt, batch):
        opt.zero_grad()
        model(batch)["loss"].backward()
        opt.step()

    for model, opt, batch in ((sig, opts[0], sig_batch), (cap, opts[1], cap_batch)):
        step(model, opt, batch)  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        step(sig, opts[0], sig_batch)
        step(cap, opts[1], cap_batch)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(workload(args.steps))
        return 0
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    wide = [f for f in ("avx512f", "avx512_bf16", "amx_tile") if f" {f}" in flags]
    print(f"CPU: {cpu} ({os.cpu_count()} cores; {', '.join(wide) or 'no AVX-512'}), torch threads: default")
    times: dict[str, list[float]] = {"avx2 (pinned)": [], "native": []}
    for _ in range(args.rounds):
        for name in times:  # alternating, so drift on a shared machine hits both
            env = {k: v for k, v in os.environ.items() if k not in PIN}
            if name == "native":
                env.update(NATIVE)
            r = subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps)], env=env,
                               capture_output=True, text=True, check=True)
            times[name].append(float(r.stdout.strip().splitlines()[-1]))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"  {k:14s} median {med[k]:6.2f} s  (runs: {', '.join(f'{x:.2f}' for x in v)})")
    print(f"  pinned / native = {med['avx2 (pinned)'] / med['native']:.3f}  (above 1: the pin costs time)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
