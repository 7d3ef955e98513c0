"""QLoRA vs LoRA on a 32-bit base vs full fine-tuning; dynamic padding vs padding to 2048.

    python benchmarks/bench_qlora.py [--hidden 768 --layers 12 --vocab 8192] [--batch-size 2]
                                     [--warmup-steps 2 --steps 3] [--no-pad-2048] [--out FILE]

One mid-size Phi configuration (default ~98M parameters: hidden 768, 12
layers, 12 heads, MLP 3072, vocab 8192; random init) is written once with
``save_pretrained``, and each variant runs in its OWN subprocess, loading it
with ``from_pretrained`` exactly as the pipeline does
(``vlmpipe.models.qa_model.load_base``):

- ``qlora``:  4-bit NF4 + double quantization, ``prepare_model_for_kbit_training``, LoRA;
- ``lora32``: fp32 base, frozen, LoRA;
- ``full``:   fp32 base, every parameter trained.

All three use the LoRA settings and gradient checkpointing of ``--params``
(default ``presets/full.yaml``, the settings that train Phi-2: r 8, alpha 16,
rsLoRA, targets q_proj k_proj v_proj dense fc1 fc2, gradient checkpointing on;
``--params params.yaml`` gives the offline default's r 32 without it), AdamW
and the same batches.

Memory held while training = resident memory after ``--warmup-steps``
optimizer steps minus resident memory just before the model is loaded (imports
done), both read from ``/proc/self/status`` after freed heap is handed back to
the OS (``malloc_trim``), so transients of loading (the fp32 weights read before
quantization) are not counted. It is the anonymous part (``RssAnon``): the
checkpoint file stays memory-mapped after loading, and its clean, reclaimable
page-cache pages (``RssFile``, ~the file size in every variant) are shown apart
("mapped"). The fp32 variants copy their weights out of that mapping first, so
their weights count as held, as in any run that updates or moves them. The
process peak (``ru_maxrss``), which loading transients dominate, is printed too.

Throughput = useful (non-padding) tokens per second over ``--steps`` timed
steps, on batches of conversation-length sequences (48-96 tokens, like the
Q/A conversations) padded to the longest in the batch (dynamic padding). The
``qlora`` process also times one step with every sample padded to 2048 tokens
and the loss over the padding, as the original framework did.

Timings on a shared 2-core CPU are noisy: ``--rounds 2`` runs every variant
twice, in alternating order, and keeps each one's faster round.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("bench_qlora")
VARIANTS = ("qlora", "lora32", "full")
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def rss_parts() -> dict[str, float]:
    """RssAnon / RssFile of /proc/self/status, in MB (file-backed pages: e.g. a memory-mapped checkpoint)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                k, v, _ = line.split()
                out[k[:-1]] = int(v) / 1024
    return out


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: RSS may then include freed heap
        pass


def batches(vocab: int, batch_size: int, n: int, seed: int, pad_to: int | None = None):
    """``n`` batches of random-token sequences, 48-96 tokens each; padding masked (labels -100)
    for dynamic padding, but counted in the loss when ``pad_to`` (as the original framework did)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lens = torch.randint(48, 97, (batch_size,), generator=g)
        width = pad_to or int(lens.max())
        ids = torch.randint(3, vocab, (batch_size, width), generator=g)
        mask = (torch.arange(width)[None] < lens[:, None]).long()
        ids = ids.masked_fill(mask == 0, 0)
        labels = ids.clone() if pad_to else ids.masked_fill(mask == 0, -100)
        # The original padded to a fixed length AND attended to / computed loss on the padding.
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(mask) if pad_to else mask,
                    "labels": labels, "useful": int(lens.sum())})
    return out


def child(args) -> dict:
    """One variant, in this process: memory held while training and useful tokens/s."""
    import torch

    from vlmpipe.models.qa_model import load_base
    from vlmpipe.ops.preflight import load_all as load_params

    import bitsandbytes  # noqa: F401 - imported before the baseline, as the pipeline does
    import peft

    torch.manual_seed(0)
    p = load_params(args.params).phi2
    trim()
    rss0, parts0 = rss_bytes(), rss_parts()
    device = torch.device("cpu")
    model = load_base(args.model_dir, args.variant == "qlora", "sdpa", device)
    if args.variant != "qlora":
        # fp32 weights may be zero-copy views of the memory-mapped checkpoint (file-backed pages);
        # give them their own memory, as any training run that updates or moves them does.
        with torch.no_grad():
            for q in model.parameters():
                q.data = q.data.clone()
    gc_kwargs = {"use_reentrant": False}
    if args.variant == "qlora":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=p.gradient_checkpointing,
                                                     gradient_checkpointing_kwargs=gc_kwargs)
    elif p.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    if args.variant in ("qlora", "lora32"):
        for q in model.parameters():
            q.requires_grad_(False)
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout, use_rslora=p.use_rslora,
            target_modules=list(p.target_modules), bias="none", task_type="CAUSAL_LM"))
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(b) -> None:
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    data = batches(args.vocab, args.batch_size, args.warmup_steps + args.steps, seed=1)
    for b in data[:args.warmup_steps]:
        step(b)
    trim()
    parts = {k: v - parts0[k] for k, v in rss_parts().items()}
    held = parts["RssAnon"] * 2**20  # the checkpoint's mapping (file-backed, reclaimable) is reported apart
    t0 = time.perf_counter()
    for b in data[args.warmup_steps:]:
        step(b)
    dt = time.perf_counter() - t0
    useful = sum(b["useful"] for b in data[args.warmup_steps:])
    padded = sum(b["input_ids"].numel() for b in data[args.warmup_steps:])
    res = {"variant": args.variant, "held_mb": held / 2**20, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "trainable": sum(q.numel() for q in params), "total_params": sum(q.numel() for q in model.parameters()),
           "tokens_per_s": useful / dt, "rss_mb": (rss_bytes() - rss0) / 2**20, "mapped_file_mb": parts["RssFile"], "step_s": dt / args.steps, "padding_frac": 1 - useful / padded}
    if args.pad_2048:
        (b,) = batches(args.vocab, args.batch_size, 1, seed=2, pad_to=2048)
        t0 = time.perf_counter()
        step(b)
        dt = time.perf_counter() - t0
        res.update(pad2048_tokens_per_s=b["useful"] / dt, pad2048_step_s=dt, pad2048_useful_frac=b["useful"] / b["input_ids"].numel())
    return res


def make_model(args, out: Path) -> int:
    import torch
    from transformers import AutoModelForCausalLM, PhiConfig

    cfg = PhiConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                    num_hidden_layers=args.layers, num_attention_heads=args.heads, max_position_embeddings=2048,
                    resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, tie_word_embeddings=False,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out, safe_serialization=True)
    return sum(q.numel() for q in model.parameters())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="run each variant this many times (alternating order); keep the fastest")
    ap.add_argument("--no-pad-2048", dest="pad_2048", action="store_false")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    ap.add_argument("--params", type=Path, default=REPO / "presets/full.yaml",
                    help="params file whose phi2 LoRA settings and gradient checkpointing to use (default: %(default)s)")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "peft", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.variant:
        print(json.dumps(child(args)))
        return 0

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-qlora-") as tmp:
        n = make_model(args, Path(tmp) / "phi")
        log.info("Phi config: hidden %d, %d layers, vocab %d: %.1fM parameters; batch %d, %d warm-up + %d timed steps",
                 args.hidden, args.layers, args.vocab, n / 1e6, args.batch_size, args.warmup_steps, args.steps)
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        order = [v for r in range(args.rounds) for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1])]
        for k, v in enumerate(order):
            cmd = [sys.executable, __file__, "--variant", v, "--model-dir", str(Path(tmp) / "phi"), "--params", str(args.params),
                   "--hidden", str(args.hidden), "--layers", str(args.layers), "--heads", str(args.heads),
                   "--vocab", str(args.vocab), "--batch-size", str(args.batch_size),
                   "--warmup-steps", str(args.warmup_steps), "--steps", str(args.steps)]
            if not args.pad_2048 or v != "qlora" or runs["qlora"]:  # one 2048-padded step is enough
                cmd.append("--no-pad-2048")
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if r.returncode != 0:
                sys.stderr.write(r.stderr[-3000:])
                raise SystemExit(f"variant {v} failed")
            runs[v].append(json.loads(r.stdout.strip().splitlines()[-1]))
            log.info("%s done in %.0fs (%d/%d)", v, time.perf_counter() - t0, k + 1, len(order))
    rows = []
    for v in VARIANTS:
        best = dict(min(runs[v], key=lambda x: x["step_s"]))
        for x in runs[v]:  # the 2048-padded step ran in one round only
            best.update({k: val for k, val in x.items() if k.startswith("pad2048")})
        rows.append(best)

    by = {r["variant"]: r for r in rows}
    lines = [f"{'variant':<8} {'trainable':>11} {'held MB':>9} {'mapped MB':>10} {'peak MB':>9} {'tokens/s':>9} {'s/step':>7}"]
    for r in rows:
        lines.append(f"{r['variant']:<8} {r['trainable'] / 1e6:>10.2f}M {r['held_mb']:>9.0f} {r['mapped_file_mb']:>10.0f} "
                     f"{r['peak_mb']:>9.0f} {r['tokens_per_s']:>9.1f} {r['step_s']:>7.2f}")
    q, l32, full = by["qlora"], by["lora32"], by["full"]
    lines += ["", "memory held while training (anonymous RSS after warm-up steps - before loading):",
              f"  full / qlora = {full['held_mb'] / q['held_mb']:.1f}x   lora32 / qlora = {l32['held_mb'] / q['held_mb']:.1f}x"
              f"   full / lora32 = {full['held_mb'] / l32['held_mb']:.1f}x",
              "useful tokens/s:",
              f"  qlora / lora32 = {q['tokens_per_s'] / l32['tokens_per_s']:.2f}x   qlora / full = "
              f"{q['tokens_per_s'] / full['tokens_per_s']:.2f}x"]
    if "pad2048_tokens_per_s" in q:
        lines += [f"padding (qlora, batch {args.batch_size}): dynamic {q['tokens_per_s']:.0f} useful tokens/s "
                  f"({100 * q['padding_frac']:.0f}% padding) vs fixed 2048 {q['pad2048_tokens_per_s']:.1f} useful tokens/s "
                  f"({100 * (1 - q['pad2048_useful_frac']):.1f}% padding, {q['pad2048_step_s']:.1f} s/step): "
                  f"{q['tokens_per_s'] / q['pad2048_tokens_per_s']:.0f}x"]
    lines.append(f"(total {time.perf_counter() - t_all:.0f}s)")
    sys.stdout.write("\n".join(lines) + "\n")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "out"}, "results": rows},
                                       indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
