"""What packing the language models' training batches buys on a CPU: one run, as ratios.

    python benchmarks/bench_packing.py [--params params.yaml] [--steps 20] [--rounds 3]

The captioner and the chat model of ``--params`` built by the pipeline's own code (the tiny GPT-2 of
``captioner.tiny``, random weights: a step's cost does not depend on them, the captioner's projector
over its image regions), on captions and conversations drawn about random shapes-world scenes by the
offline default's own generators (``vlmpipe/sources/shapes.py``, ``scene_dialogues.py``). Each model
trains on the same batches (its stage's batch size, AdamW) padded one example a row
(``PrefixLM.collate``) and packed several a row (``PrefixLM.pack``, what the stages train on), timed
in alternating order, each keeping its fastest round of ``--steps`` steps. Also printed: the share of
the positions a step computes that hold an example's prefix or text (the rest is padding).

Run it on an idle machine.
"""
from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(Path(__file__).resolve().parent), str(REPO)]
from bench_lm_step import tiny_lm_params  # noqa: E402 - the sibling benchmark's command line
from bench_lora_dropout import timed_steps  # noqa: E402 - the sibling benchmark's timed training steps


def filled(model, data, batch_size: int, collate) -> float:
    """The share of the computed positions that hold a prefix or text token, over the first 50 batches."""
    real = total = 0
    for s in range(0, min(len(data), 50 * batch_size) - batch_size + 1, batch_size):
        examples = [data[i] for i in range(s, s + batch_size)]
        batch = collate(examples)
        rows, width = batch["input_ids"].shape
        padded = "position_ids" not in batch
        total += rows * (width + model.config.prefix_tokens if padded else width)
        real += sum(len(e["input_ids"]) + model.config.prefix_tokens for e in examples)
    return real / total


def main() -> int:
    args, p = tiny_lm_params(__doc__)
    from vlmpipe.data.captions import CaptionDataset
    from vlmpipe.data.chat import ChatDataset
    from vlmpipe.loop import tiny_base
    from vlmpipe.models.captioner import build_captioner
    from vlmpipe.models.chat_model import ChatModel
    from vlmpipe.sources import scene_dialogues, shapes

    c, chat = p.captioner, p.chat
    rng = np.random.default_rng(0)
    captions = [shapes.scene_captions(shapes.random_scene(rng), rng, 5) for _ in range(512)]
    convs = [scene_dialogues.dialogue(shapes.random_scene(rng), rng)[0] for _ in range(512)]
    texts = [" ".join(f"{q} {a}" for q, a in t) for t in convs] + [x for caps in captions for x in caps]
    dim = 512
    feats = torch.nn.functional.normalize(torch.randn(512, c.regions, dim, generator=torch.Generator().manual_seed(0)),
                                          dim=-1).half()
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as tmp:
        lm = tiny_base.build("gpt2", dataclasses.replace(c.tiny, warmup_steps=0), texts, Path(tmp) / "lm", seed=0)
        captioner = build_captioner(lm, encoder={"name": "bench"}, feature_dim=dim, regions=c.regions,
                                    prefix_tokens=c.prefix_tokens, freeze_lm=False, beam_size=1,
                                    max_caption_tokens=c.max_caption_tokens, seed=0, source_name="tiny")
        chat_model = ChatModel.from_captioner(captioner, max_seq_len=chat.max_seq_len,
                                              max_new_tokens=chat.max_new_tokens)
        cases = {
            "captioner": (captioner, CaptionDataset(feats, captions, captioner.tokenizer, c.max_caption_tokens),
                          c.train.batch_size),
            "chat": (chat_model, ChatDataset(chat_model.tokenizer, feats, list(range(len(convs))), convs,
                                             chat_model.window), chat.train.batch_size),
        }
        print(f"{args.params.name}: the tiny GPT-2 (hidden {c.tiny.hidden_size}, {c.tiny.layers} layers); "
              f"{torch.get_num_threads()} threads; fastest of {args.rounds} rounds of {args.steps} steps")
        for name, (model, data, batch) in cases.items():
            ways = {"padded": model.collate, "packed": model.pack}
            best = {k: float("inf") for k in ways}
            for r in range(args.rounds):
                for k in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
                    best[k] = min(best[k], timed_steps(model, data, batch, args.steps, seed=r, collate=ways[k]))
            for k, collate in ways.items():
                print(f"  {name:9s}  batch {batch:3d}  {k:6s}  {best[k] * 1e3:6.1f} ms a step  "
                      f"{100 * filled(model, data, batch, collate):3.0f} % of positions filled  "
                      f"{best['padded'] / best[k]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
