"""The full preset's four heavy steps at their real sizes, random weights, on one device: what a GPU does.

    python benchmarks/gpu_check.py [--size full|tiny] [--device cuda|cpu] [--steps 10] [--out FILE]

Each part builds its model with the pipeline's own code (real architectures, random weights: no
download) and times ``--steps`` steps after ``--warmup`` untimed ones, synchronising the device
only around the timed block:

1. ``siglip``: one SigLIP training step, ResNet-50 at 224 px + the small text tower (batch 128):
   samples/s and MFU (``vlmpipe/core/flops.py``).
2. ``clip_precompute``: CLIP ViT-B/16 features of JPEGs read from a zip (COCO's layout), decoded in
   DataLoader workers, through the pipeline's ``embed_sharded``: images/s, decoding included.
3. ``captioner``: one GPT-2 124M captioner step (10 prefix tokens + 40 caption tokens, batch 64):
   tokens/s and MFU.
4. ``phi2_qlora``: one QLoRA step of a Phi-2-shaped base (32 layers, 2560 wide, 4-bit NF4, LoRA r 8
   on the full preset's modules, gradient checkpointing; batch 8 x 256 tokens): tokens/s, MFU and
   peak device memory.

Precision: bf16 autocast on CUDA (the full preset's ``precision: auto``), fp32 on a CPU.
``--size tiny`` shrinks every model (same code) so the suite runs it on a CPU in seconds
(tests/test_gpu_check.py); the figures it prints then mean nothing about a GPU. The output starts
with the device's name; ``--out`` writes the figures as JSON. Budget: about 5 minutes on one
H100-class GPU at ``--size full`` (most of it building and 4-bit-loading the Phi-2-shaped base).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vlmpipe.core.errors import setup_logging  # noqa: E402

log = logging.getLogger("gpu_check")

SIZES = {
    "full": dict(resnet="resnet50", image=224, siglip_batch=128, text_width=128, clip_images=1024, clip_batch=256,
                 jpeg=(640, 480), gpt2=dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257), cap_batch=64,
                 phi=dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
                          vocab_size=51200), phi_batch=8, phi_seq=256, lora_r=8),
    "tiny": dict(resnet="resnet_small", image=32, siglip_batch=16, text_width=32, clip_images=24, clip_batch=8,
                 jpeg=(64, 48), gpt2=dict(n_embd=64, n_layer=2, n_head=2, vocab_size=1024), cap_batch=4,
                 phi=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                          vocab_size=1024), phi_batch=2, phi_seq=32, lora_r=4),
}
TEXTS = [f"a {s} {c} {k} in the {w}" for s in ("small", "large") for c in ("red", "blue", "green", "pink")
         for k in ("circle", "square", "ring", "hexagon") for w in ("top left", "bottom right", "middle")]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_steps(step, device: torch.device, steps: int, warmup: int) -> float:
    """Seconds per step, over ``steps`` after ``warmup`` (the device synchronised around the block)."""
    for _ in range(warmup):
        step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t) / steps


def _train_step(model, batch: dict, device: torch.device, dtype: torch.dtype):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda" or None)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _report(name: str, sec: float, samples: int, flops: int, device, dtype, tokens: int = 0, **extra) -> dict:
    from vlmpipe.core.flops import peak_flops

    peak, source = peak_flops(device, dtype)
    out = {"step_s": round(sec, 4), "samples_per_s": round(samples / sec, 1)}
    if tokens:
        out["tokens_per_s"] = round(tokens / sec, 1)
    if flops:
        out.update(model_tflops=round(flops / sec / 1e12, 3), mfu=round(flops / sec / peak, 4) if peak == peak else None,
                   peak_tflops=round(peak / 1e12, 2), peak_source=source)
    out.update(extra)
    log.info("%-16s %s", name, "  ".join(f"{k} {v}" for k, v in out.items() if k != "peak_source"))
    return out


def check_siglip(z: dict, device, dtype, steps: int, warmup: int) -> dict:
    from vlmpipe.models.siglip.model import build_siglip
    from vlmpipe.siglip.params import SiglipParams

    p = SiglipParams(backbone=z["resnet"], pretrained=False, image_size=z["image"], text_width=z["text_width"])
    torch.manual_seed(0)
    model = build_siglip(p, TEXTS).to(device).train()
    n = z["siglip_batch"]
    rng = np.random.default_rng(0)
    texts = model.tokenize([TEXTS[i % len(TEXTS)] for i in range(n)])
    batch = {"images": torch.from_numpy(rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)).to(device),
             **{k: v.to(device) for k, v in texts.items()}, "text_ids": torch.arange(n, device=device)}
    sec = _timed_steps(_train_step(model, batch, device, dtype), device, steps, warmup)
    return _report("siglip", sec, n, model.train_flops(batch), device, dtype, backbone=z["resnet"], image_px=z["image"])


def check_clip_precompute(z: dict, device, dtype, steps: int, warmup: int, workdir: Path) -> dict:
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from vlmpipe.data import features as E

    archive = workdir / "val2017.zip"
    rng = np.random.default_rng(0)
    w, h = z["jpeg"]
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:  # COCO's zips store JPEGs as they are
        for i in range(z["clip_images"]):
            img = Image.fromarray(rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            zf.writestr(f"val2017/{i:012d}.jpg", buf.getvalue())
    cfg = CLIPVisionConfig(patch_size=16, image_size=224) if z is SIZES["full"] else \
        CLIPVisionConfig(patch_size=16, image_size=224, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2)
    torch.manual_seed(0)
    model = CLIPVisionModel(cfg).to(device).eval()
    processor = CLIPImageProcessor()  # resize 224, centre crop, normalise: as the hub's ViT-B/16 does
    reader = _ZipImages(archive)

    def encode(images: list) -> torch.Tensor:
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return model(pixel_values=pixels).pooler_output.float()

    ids = list(range(z["clip_images"]))
    workers = min(8, os.cpu_count() or 1)
    E.embed_sharded(encode, ids[: z["clip_batch"]], reader.image, z["clip_batch"], "warm-up", num_workers=workers)
    _sync(device)
    t = time.perf_counter()
    emb = E.embed_sharded(encode, ids, reader.image, z["clip_batch"], "clip", num_workers=workers)
    _sync(device)
    sec = time.perf_counter() - t
    assert emb.shape[0] == len(ids)
    return _report("clip_precompute", sec, len(ids), 0, device, dtype, workers=workers, jpeg_px=f"{w}x{h}")


class _ZipImages:
    """JPEG members of a zip, decoded to RGB (what ``CocoCaptions.image`` does), openable in workers."""

    def __init__(self, path: Path) -> None:
        self.path, self._zf = path, None

    def image(self, i: int):
        from PIL import Image

        if self._zf is None:
            self._zf = zipfile.ZipFile(self.path)
        return Image.open(io.BytesIO(self._zf.read(f"val2017/{i:012d}.jpg"))).convert("RGB")

    def __getstate__(self) -> dict:
        return {"path": self.path, "_zf": None}


def _save_lm(kind: str, arch: dict, folder: Path, device: torch.device) -> Path:
    """A random-init causal LM of ``kind`` in bf16 with a small BPE, saved as a hub-style folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from vlmpipe.core.text import train_bpe_tokenizer

    cfg = AutoConfig.for_model(kind, **arch)
    torch.manual_seed(0)
    with torch.device(device):  # initialise where it is fast: 2.7B parameters on a CPU take minutes
        lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    lm.save_pretrained(folder)
    train_bpe_tokenizer(TEXTS, 512).save_pretrained(folder)
    del lm
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return folder


def _lm_batch(b: int, t: int, feats: torch.Tensor, vocab: int, device) -> dict:
    ids = torch.randint(3, vocab, (b, t), device=device)
    return {"feats": feats.to(device), "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def check_captioner(z: dict, device, dtype, steps: int, warmup: int, workdir: Path) -> dict:
    from vlmpipe.models.captioner import build_captioner

    folder = _save_lm("gpt2", z["gpt2"], workdir / "gpt2", device)
    model = build_captioner(folder, encoder={"name": "clip"}, feature_dim=768, regions=5, prefix_tokens=10,
                            freeze_lm=False, beam_size=5, max_caption_tokens=40).to(device).train()
    b, t = z["cap_batch"], 40
    batch = _lm_batch(b, t, torch.randn(b, 5, 768), z["gpt2"]["vocab_size"], device)
    sec = _timed_steps(_train_step(model, batch, device, dtype), device, steps, warmup)
    return _report("captioner", sec, b, model.train_flops(batch), device, dtype, tokens=b * t,
                   lm_params_m=round(sum(p.numel() for p in model.lm.parameters()) / 1e6, 1))


def check_phi2_qlora(z: dict, device, dtype, steps: int, warmup: int, workdir: Path) -> dict:
    from vlmpipe.models.qa_model import build_qa_model
    from vlmpipe.qa.params import Phi2Params
    from vlmpipe.core.params import TrainParams

    folder = _save_lm("phi", z["phi"], workdir / "phi", device)
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    p = Phi2Params(base_model=str(folder), lora_r=z["lora_r"], lora_alpha=2 * z["lora_r"], gradient_checkpointing=True,
                   train=TrainParams(precision=precision))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_qa_model(p, folder, device, encoder={"name": "siglip"}, feature_dim=512, regions=1).train()
    b, t = z["phi_batch"], z["phi_seq"]
    batch = _lm_batch(b, t, torch.randn(b, 1, 512), z["phi"]["vocab_size"], device)
    sec = _timed_steps(_train_step(model, batch, device, dtype), device, steps, warmup)
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    counts = model.trainable_counts()
    return _report("phi2_qlora", sec, b, model.train_flops(batch), device, dtype, tokens=b * t,
                   peak_memory_mb=round(peak_mb) if peak_mb else None, layers=z["phi"]["num_hidden_layers"],
                   lora_params_m=round(counts["lora_params"] / 1e6, 2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", nargs="*", choices=["siglip", "clip_precompute", "captioner", "phi2_qlora"])
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    setup_logging()
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from vlmpipe.core.flops import device_name

    z = SIZES[a.size]
    result = {"device": device_name(device), "size": a.size, "precision": str(dtype).replace("torch.", ""),
              "torch": torch.__version__, "checks": {}}
    log.info("gpu_check on %s (%s, %s)", result["device"], a.size, result["precision"])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vlmpipe-gpu-check-") as tmp:
        for name in a.only or ["siglip", "clip_precompute", "captioner", "phi2_qlora"]:
            t = time.perf_counter()
            fn = globals()[f"check_{name}"]
            args = (z, device, dtype, a.steps, a.warmup) + (() if name == "siglip" else (Path(tmp),))
            result["checks"][name] = {**fn(*args), "seconds_total": round(time.perf_counter() - t, 1)}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    log.info("gpu_check done in %.0f s", result["seconds"])
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
