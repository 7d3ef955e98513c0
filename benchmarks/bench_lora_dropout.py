"""What dropout on the QA model's LoRA adapters costs a CPU training step: with and without it, one run.

    python benchmarks/bench_lora_dropout.py [--params params.yaml] [--dropout 0.05] [--steps 20] [--rounds 3]

The QA model of ``--params`` built by the pipeline's own code (``build_qa_model``: the tiny Phi of
``phi2.tiny`` in 4-bit NF4, LoRA with the params' r, alpha, rsLoRA and targets, the prefix projector),
on a tiny base with random weights (no warm-up: the step's cost does not depend on them) and
generated conversations of the offline default's shape (5 short Q/A turns about one feature vector).
Two models from the same base and seed differ only in ``lora_dropout``: ``--dropout`` against 0.
Each round times ``--steps`` training steps (batch ``phi2.train.batch_size``, AdamW) of each, in
alternating order; each keeps its fastest round. Then one dropout mask against the rank-r product
it feeds, on an input as wide as ``fc2``'s. Run it on an idle machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ["red", "blue", "green", "star", "ring", "square", "yes", "no", "large", "small", "dark", "light"]


def conversations(n: int, seed: int) -> list[list[tuple[str, str]]]:
    r = random.Random(seed)
    return [[(f"what is the {r.choice(WORDS)} {r.choice(WORDS)} here?", r.choice(WORDS)) for _ in range(5)]
            for _ in range(n)]


def timed_steps(model, data, batch_size: int, steps: int, seed: int, collate=None) -> float:
    """Seconds per training step over ``steps`` steps (after one untimed step); batches from ``collate``
    (default: the model's padded ``collate``)."""
    collate = collate or model.collate
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    order = random.Random(seed).sample(range(len(data)), len(data))
    model.train()

    def step(k: int) -> None:
        idx = [order[(k * batch_size + i) % len(order)] for i in range(batch_size)]
        model(collate([data[i] for i in idx]))["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)
    t0 = time.perf_counter()
    for k in range(1, steps + 1):
        step(k)
    return (time.perf_counter() - t0) / steps


def per_call(fn, n: int = 30) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--dropout", type=float, default=0.05, help="the adapters' dropout compared with none")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import logging

    from vlmpipe.data.conversations import QADataset
    from vlmpipe.loop import tiny_base
    from vlmpipe.models.qa_model import build_qa_model
    from vlmpipe.ops.preflight import load_all

    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.WARNING)
    hf_logging.disable_progress_bar()  # the loading bars would bury the three lines this prints
    p = load_all(args.params).phi2
    if p.base_model != "tiny":
        raise SystemExit(f"{args.params}: phi2.base_model is {p.base_model!r}; this benchmark builds the tiny base")
    convs = conversations(1024, seed=0)
    feats = torch.nn.functional.normalize(torch.randn(len(convs), 1, 512, generator=torch.Generator().manual_seed(0)),
                                          dim=-1).half()
    texts = [" ".join(f"{q} {a}" for q, a in c) for c in convs]
    with tempfile.TemporaryDirectory(prefix="bench-lora-dropout-") as tmp:
        base = tiny_base.build("phi", dataclasses.replace(p.tiny, warmup_steps=0), texts, Path(tmp) / "base", seed=0)
        models = {}
        for d in (args.dropout, 0.0):
            models[d] = build_qa_model(dataclasses.replace(p, lora_dropout=d), base, "cpu", encoder={"name": "bench"},
                                       feature_dim=512, regions=1, seed=0)
        data = QADataset(models[0.0].tokenizer, feats, convs, p.max_seq_len)
        best = {d: float("inf") for d in models}
        for r in range(args.rounds):
            for d in (list(models) if r % 2 == 0 else list(models)[::-1]):
                best[d] = min(best[d], timed_steps(models[d], data, p.train.batch_size, args.steps, seed=r))
    threads = torch.get_num_threads()
    width = 4 * p.tiny.hidden_size  # fc2's input
    x = torch.randn(p.train.batch_size, 80, width)
    a = torch.randn(p.lora_r, width)
    drop = torch.nn.Dropout(args.dropout).train()
    mask_s, product_s = per_call(lambda: drop(x)), per_call(lambda: torch.nn.functional.linear(x, a))
    with_d, without = best[args.dropout], best[0.0]
    print(f"{args.params.name}: tiny Phi hidden {p.tiny.hidden_size}, {p.tiny.layers} layers, 4-bit {p.load_in_4bit}; "
          f"LoRA r {p.lora_r} on {', '.join(p.target_modules)}; batch {p.train.batch_size}; {threads} threads; "
          f"fastest of {args.rounds} rounds of {args.steps} steps")
    print(f"training step: lora_dropout {args.dropout} {with_d * 1e3:.0f} ms, 0 {without * 1e3:.0f} ms: "
          f"{with_d / without:.2f}x ({100 * (1 - without / with_d):.0f} % of the step is the dropout)")
    print(f"one dropout mask on [{x.shape[0]}, {x.shape[1]}, {width}]: {mask_s * 1e3:.2f} ms; the rank-{p.lora_r} "
          f"product it feeds: {product_s * 1e3:.2f} ms ({mask_s / product_s:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
