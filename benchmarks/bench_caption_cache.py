"""Captioner training throughput: cached features vs the frozen encoder run in the loop.

    python benchmarks/bench_caption_cache.py [--images N] [--steps 20] [--batch-size N] [--root DIR] [--out FILE]

Both variants train the same captioner (same init, same batches, same batch
size, same process) for ``--steps`` optimizer steps after ``--warmup`` untimed
ones, interleaved step by step so that other load on a shared machine hits
both alike:

- cached:  features come from a tensor computed once beforehand (what the
  pipeline does: ``precompute_embeddings`` then ``train_gpt2_captioner``);
- in loop: every step decodes the batch's images from the COCO archive and
  runs the frozen encoder on them (whole image + quadrants, no_grad, eval
  mode), as a captioner without the cache would.

Uses ``data/coco`` and ``models/siglip`` under ``--root`` when present (else a generated scene
set and an untrained tower of the configured size: same compute), the
captioner params of ``params.yaml`` (or $VLMPIPE_PARAMS). Reports tokens/s
(target tokens: caption + EOS) and samples/s of each, and their ratio.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vlmpipe.core.errors import setup_logging  # noqa: E402

log = logging.getLogger("bench_caption_cache")


class _Images:
    """Images and captions: the ingested COCO train split, or scenes generated in memory."""

    def __init__(self, coco_root: Path, n: int, image_size: int, seed: int) -> None:
        self.coco = None
        if (coco_root / "annotations").exists():
            from vlmpipe.data.coco import CocoCaptions

            self.coco = CocoCaptions(coco_root, "train")
            self.ids = self.coco.ids[:n]
            self.captions = [self.coco.captions(i) for i in self.ids]
            self.source = str(coco_root)
        else:
            from PIL import Image

            from vlmpipe.sources.shapes import random_scene, scene_captions

            rng = np.random.default_rng(seed)
            scenes = [random_scene(rng, image_size) for _ in range(n)]
            self.captions = [scene_captions(s, rng) for s in scenes]
            self._pil = [Image.fromarray(s.image) for s in scenes]
            self.ids = list(range(n))
            self.source = f"{n} generated {image_size}px scenes"

    def image(self, k: int):
        """Image ``k`` decoded (from the JPEG in the archive when reading data/coco)."""
        return self.coco.image(self.ids[k]) if self.coco is not None else self._pil[k].copy()


def _encoder(p, texts: list[str], root: Path):
    """``fn(images) -> [b, R, D]`` of the captioner's frozen encoder, and where it came from."""
    from vlmpipe.data import features as embeddings

    enc = p.captioner.vision_encoder
    if enc != "siglip":
        fn, _ = embeddings.clip_encoder(enc, p.captioner.regions, torch.device("cpu"))
        return fn, enc
    from vlmpipe.models.siglip.model import build_siglip, load_siglip

    if (root / "models/siglip/model.safetensors").exists():
        tower, where = load_siglip(root / "models/siglip"), f"{root / 'models/siglip'} (trained)"
    else:
        torch.manual_seed(0)
        tower, where = build_siglip(p.siglip, texts).eval(), "an untrained SigLIP of the configured size"
    return embeddings.siglip_encoder(tower, p.captioner.regions), where


def _train_step(model, opt, batch, clip: float) -> int:
    out = model(batch)
    out["loss"].backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return int(out["tokens"])


def _run(variants: dict, batches, clip: float, lr: float, warmup: int) -> dict[str, dict]:
    """Train every variant on the same batches, interleaved step by step, so that load from
    other processes on a shared machine hits all variants alike."""
    state = {}
    for name, (model, _) in variants.items():
        model.train()
        state[name] = {"opt": torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=lr),
                       "seconds": 0.0, "tokens": 0, "samples": 0, "encoder_seconds": 0.0}
    for k, idx in enumerate(batches):
        for name, (model, make_batch) in variants.items():
            st = state[name]
            t0 = time.perf_counter()
            batch, enc_s = make_batch(idx)
            tokens = _train_step(model, st["opt"], batch, clip)
            dt = time.perf_counter() - t0
            if k >= warmup:
                st["seconds"] += dt
                st["tokens"] += tokens
                st["samples"] += len(idx)
                st["encoder_seconds"] += enc_s
    out = {}
    for name, st in state.items():
        n = len(batches) - warmup
        out[name] = {"steps": n, "tokens_per_s": st["tokens"] / st["seconds"],
                     "samples_per_s": st["samples"] / st["seconds"], "step_s": st["seconds"] / n,
                     "encoder_share": st["encoder_seconds"] / st["seconds"]}
        log.info("%-8s %.0f tokens/s, %.1f samples/s, %.3f s/step (decode+encode %.0f%% of it)", name,
                 out[name]["tokens_per_s"], out[name]["samples_per_s"], out[name]["step_s"],
                 100 * out[name]["encoder_share"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=None,
                    help="training images (x their captions = samples); default: enough for the steps at 5 captions each")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--batch-size", type=int, default=None, help="default: captioner.train.batch_size")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    ap.add_argument("--root", type=Path, default=REPO, help="where data/coco and models/siglip are (default: the repo)")
    args = ap.parse_args(argv)
    setup_logging()
    import os

    from vlmpipe.data.captions import CaptionDataset
    from vlmpipe.models.lm.collate import pad_collate
    from vlmpipe.models.captioner import build_captioner
    from vlmpipe.ops.preflight import load_all as load_params
    from vlmpipe.loop.tiny_base import build as build_tiny_base

    root = args.root.resolve()
    os.chdir(REPO)  # params.yaml (or $VLMPIPE_PARAMS) relative to the repo
    p = load_params()
    cp = p.captioner
    bs = args.batch_size or cp.train.batch_size
    if args.images is None:  # COCO has five captions per image
        args.images = -(-(args.steps + args.warmup) * bs // 5)
    torch.manual_seed(p.seed)
    data = _Images(root / "data/coco", args.images, p.coco.image_size, p.seed)
    texts = [c for caps in data.captions for c in caps]
    fn, where = _encoder(p, texts, root)

    # The "cache": every image featurized once, as precompute_embeddings does.
    t0 = time.perf_counter()
    with torch.no_grad():
        feats = torch.cat([fn([data.image(k) for k in range(i, min(len(data.ids), i + 64))]).float()
                           for i in range(0, len(data.ids), 64)]).half()
    precompute_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        lm = cp.lm if cp.lm != "tiny" else build_tiny_base("gpt2", cp.tiny, texts, Path(tmp) / "lm", p.seed)

        def fresh():  # the same initial captioner for both variants
            return build_captioner(lm, encoder={"name": cp.vision_encoder}, feature_dim=int(feats.shape[-1]),
                                   regions=cp.regions, prefix_tokens=cp.prefix_tokens, freeze_lm=cp.freeze_lm,
                                   beam_size=cp.beam_size, max_caption_tokens=cp.max_caption_tokens, seed=p.seed,
                                   projector_hidden=cp.projector_hidden)

        cached_model, loop_model = fresh(), fresh()
    ds = CaptionDataset(feats, data.captions, cached_model.tokenizer, cp.max_caption_tokens)
    owner = [img for img, _ in ds.items]
    need = (args.steps + args.warmup) * bs
    if need > len(ds):
        raise SystemExit(f"--images {args.images} gives {len(ds)} samples; {need} needed (more images or fewer steps)")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(p.seed)).tolist()
    batches = [order[i * bs:(i + 1) * bs] for i in range(args.steps + args.warmup)]
    pad = cached_model.pad_token_id

    def cached_batch(idx):
        return pad_collate([ds[i] for i in idx], pad), 0.0

    def loop_batch(idx):
        t = time.perf_counter()
        with torch.no_grad():  # frozen encoder, eval mode: one image per sample, decoded from the archive
            f = fn([data.image(owner[i]) for i in idx]).float()
        enc_s = time.perf_counter() - t
        return pad_collate([{**ds[i], "feats": f[j]} for j, i in enumerate(idx)], pad), enc_s

    clip, lr = cp.train.grad_clip, cp.train.lr
    log.info("%d images (%s), %d samples, batch %d, %d timed steps; encoder: %s; %d threads", len(data.ids),
             data.source, len(ds), bs, args.steps, where, torch.get_num_threads())
    res = _run({"cached": (cached_model, cached_batch), "in loop": (loop_model, loop_batch)}, batches, clip, lr,
               args.warmup)
    cached, in_loop = res["cached"], res["in loop"]
    ratio = cached["tokens_per_s"] / in_loop["tokens_per_s"]
    summary = {"batch_size": bs, "images": len(data.ids), "encoder": where, "regions": cp.regions,
               "precompute_s_per_image": precompute_s / len(data.ids), "cached": cached, "in_loop": in_loop,
               "speedup": ratio}
    sys.stdout.write(
        f"captioner training, batch {bs}, {args.steps} steps, {torch.get_num_threads()} threads\n"
        f"  cached features : {cached['tokens_per_s']:8.0f} tokens/s {cached['samples_per_s']:7.1f} samples/s\n"
        f"  encoder in loop : {in_loop['tokens_per_s']:8.0f} tokens/s {in_loop['samples_per_s']:7.1f} samples/s "
        f"(decode+encode {100 * in_loop['encoder_share']:.0f}% of a step)\n"
        f"  speed-up of the cache: {ratio:.2f}x (one-off precompute: {1000 * summary['precompute_s_per_image']:.1f} ms/image)\n")
    if args.out:
        from vlmpipe.core.io import write_json

        write_json(args.out, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
