"""What two changes to the tiny language models' training step buy on a CPU: one run, as ratios.

    python benchmarks/bench_lm_step.py [--params params.yaml] [--steps 20] [--rounds 3]

The chat model of ``--params`` built by the pipeline's own code: the tiny GPT-2 of ``captioner.tiny``
(``tiny_base.build``, random weights: a step's cost does not depend on them), the captioner's
projector over 5 image regions, continued as ``ChatModel``, on conversations drawn about random
shapes-world scenes by the offline default's own generator (``vlmpipe/sources/scene_dialogues.py``:
short answers, some long descriptions). Four variants of the same model, timed in alternating order,
each keeping its fastest round of ``--steps`` steps (batch ``chat.train.batch_size``, AdamW):

- the activation: GPT-2's own ``gelu_new`` (the tanh approximation as seven tensor operations)
  against torch's one-kernel ``gelu(approximate="tanh")``, which the tiny LMs use;
- the LM head: on every position (the LM's own forward, then the loss reads the target rows)
  against on the target rows only (what ``PrefixLM.forward`` does).

Run it on an idle machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(Path(__file__).resolve().parent), str(REPO)]
from bench_lora_dropout import timed_steps  # noqa: E402 - the sibling benchmark's timed training steps


def tiny_lm_params(doc: str):
    """The command line of the tiny LMs' step benchmarks (this one, bench_packing.py) and the params it
    names, quiet logging: (args, params)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import logging

    from transformers.utils import logging as hf_logging

    from vlmpipe.ops.preflight import load_all

    logging.basicConfig(level=logging.WARNING)
    hf_logging.disable_progress_bar()
    p = load_all(args.params)
    if p.captioner.lm != "tiny":
        raise SystemExit(f"{args.params}: captioner.lm is {p.captioner.lm!r}; this benchmark builds the tiny GPT-2")
    return args, p


def main() -> int:
    args, p = tiny_lm_params(__doc__)
    from transformers.activations import ACT2FN

    from vlmpipe.data.chat import ChatDataset
    from vlmpipe.loop import tiny_base
    from vlmpipe.models.captioner import build_captioner
    from vlmpipe.models.chat_model import ChatModel
    from vlmpipe.models.lm.collate import IGNORE_INDEX
    from vlmpipe.sources import scene_dialogues, shapes

    c, chat = p.captioner, p.chat
    rng = np.random.default_rng(0)
    convs = [scene_dialogues.dialogue(shapes.random_scene(rng), rng)[0] for _ in range(1024)]
    # The tokenizer learns from captions too, as the captioner's does: its vocabulary (the LM head's
    # width) then reaches the params' size, as in the pipeline.
    texts = [" ".join(f"{q} {a}" for q, a in t) for t in convs] + \
        [cap for _ in range(2000) for cap in shapes.scene_captions(shapes.random_scene(rng), rng, 5)]
    regions, dim = c.regions, 512
    feats = torch.nn.functional.normalize(torch.randn(len(convs), regions, dim, generator=torch.Generator().manual_seed(0)),
                                          dim=-1).half()
    with tempfile.TemporaryDirectory(prefix="bench-lm-step-") as tmp:
        lm = tiny_base.build("gpt2", dataclasses.replace(c.tiny, warmup_steps=0), texts, Path(tmp) / "lm", seed=0)
        models = {}
        for act in ("gelu_new", "gelu_pytorch_tanh"):
            for head in ("every position", "targets only"):
                cap = build_captioner(lm, encoder={"name": "bench"}, feature_dim=dim, regions=regions,
                                      prefix_tokens=c.prefix_tokens, freeze_lm=False, beam_size=1,
                                      max_caption_tokens=c.max_caption_tokens, seed=0, source_name="tiny")
                model = ChatModel.from_captioner(cap, max_seq_len=chat.max_seq_len, max_new_tokens=chat.max_new_tokens)
                for block in model.lm.transformer.h:
                    block.mlp.act = ACT2FN[act]
                if head == "every position":  # as an LM whose logits come whole: its own forward
                    model.head_on_targets = False
                models[act, head] = model
        ref = models["gelu_new", "every position"]
        data = ChatDataset(ref.tokenizer, feats, list(range(len(convs))), convs, ref.window)
        share = sum(int((torch.as_tensor(data[i]["labels"]) != IGNORE_INDEX).sum()) for i in range(len(data))) / \
            sum(len(data[i]["input_ids"]) for i in range(len(data)))
        best = {k: float("inf") for k in models}
        for r in range(args.rounds):
            for k in (list(models) if r % 2 == 0 else list(models)[::-1]):
                best[k] = min(best[k], timed_steps(models[k], data, chat.train.batch_size, args.steps, seed=r))
    base = best["gelu_new", "every position"]
    print(f"{args.params.name}: chat model on the tiny GPT-2 (hidden {c.tiny.hidden_size}, {c.tiny.layers} layers, "
          f"vocab {len(ref.tokenizer)}), batch {chat.train.batch_size}, "
          f"targets {100 * share:.0f} % of the text tokens; {torch.get_num_threads()} threads; fastest of "
          f"{args.rounds} rounds of {args.steps} steps")
    for (act, head), sec in best.items():
        print(f"  {act:17s}  head on {head:14s}  {sec * 1e3:6.1f} ms a step  {base / sec:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
