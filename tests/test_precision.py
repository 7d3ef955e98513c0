"""The CUDA-only precision choices, rehearsed on the CPU.

On CUDA, ``precision: auto`` trains under bf16 autocast and QLoRA's 4-bit layers compute in bf16.
Nothing in the offline default takes that path, so a dtype mistake there (a float32 prefix
concatenated to bf16 embeddings, a loss computed in bf16, a projector that never casts) would
first show on a user's GPU. Here ``precision: bf16`` forces the same choice on the CPU: one
training step of each model through the shared loop must give a finite loss and move the weights.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmpipe.siglip.params import SiglipParams
from vlmpipe.core.params import TinyLMParams, TrainParams
from vlmpipe.core.runtime import resolve_precision
from vlmpipe.loop.train import TrainTask, fit
from vlmpipe.siglip.stage import param_groups


def _cfg(batch_size: int) -> TrainParams:
    return TrainParams(epochs=1, batch_size=batch_size, lr=1e-3, weight_decay=0.0, warmup_ratio=0.0,
                       checkpoint_every=0, device="cpu", precision="bf16")


def _one_step(task: TrainTask, cfg: TrainParams, tmp_path) -> float:
    before = {n: p.detach().clone() for n, p in task.model.named_parameters() if p.requires_grad}
    res = fit(task, cfg, seed=0, ckpt_dir=tmp_path / "ckpt", report_dir=tmp_path / "reports", identity={"t": 1})
    assert res.steps >= 1 and np.isfinite(res.final_loss)
    moved = [n for n, p in task.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved, "no trainable weight changed"
    return res.final_loss


def test_auto_precision_is_bf16_on_cuda_only():
    assert resolve_precision("auto", torch.device("cpu")) == torch.float32
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_precision("fp32", torch.device("cuda")) == torch.float32


def test_siglip_step_under_bf16_autocast(tmp_path):
    from vlmpipe.data.image_texts import ImageTextPairs
    from vlmpipe.models.siglip.model import build_siglip

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(16) % 4
    prompts = [f"a photo of a {c}" for c in ("circle", "star", "ring", "bar")]
    model = build_siglip(SiglipParams(text_width=32, text_layers=1), prompts)
    data = ImageTextPairs(images, labels, prompts, [None] * 16, [[] for _ in range(16)], model.tokenizer, 16, 0)
    task = TrainTask("siglip", model, data, data.collate,
                     param_groups=lambda m, lr: param_groups(m, lr, 0.0, 10.0))
    _one_step(task, _cfg(8), tmp_path)


def test_captioner_step_under_bf16_autocast(tmp_path):
    from vlmpipe.data.captions import CaptionDataset
    from vlmpipe.models import captioner as C
    from vlmpipe.loop.tiny_base import build as build_tiny_base

    caps = [["a red circle", "a big red circle"], ["a blue star"], ["a green ring"], ["two bars"]] * 2
    lm = build_tiny_base("gpt2", TinyLMParams(vocab_size=512, hidden_size=32, layers=1, heads=2, warmup_steps=0),
                       [c for cs in caps for c in cs], tmp_path / "lm", seed=0)
    model = C.build_captioner(lm, encoder={"name": "t"}, feature_dim=16, regions=1, prefix_tokens=2,
                              freeze_lm=False, beam_size=1, max_caption_tokens=12)
    feats = torch.randn(len(caps), 1, 16).half()
    data = CaptionDataset(feats, caps, model.tokenizer, 12)
    seen = []
    # The loss runs the LM's body, then its head on the targets: the head's output is the logits.
    model.lm.get_output_embeddings().register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    _one_step(TrainTask("captioner", model, data, model.collate), _cfg(4), tmp_path)
    assert seen and set(seen) == {torch.bfloat16}  # the LM really ran under bf16 autocast


def test_phi_qlora_step_with_bf16_4bit_compute(tmp_path):
    import bitsandbytes as bnb

    from test_phi_vlm import build, make_data, small_params
    from vlmpipe.data.conversations import QADataset
    from vlmpipe.models.qa_model import QA
    from vlmpipe.core.text import EOS
    from vlmpipe.loop.tiny_base import build as build_tiny_base

    emb, convs = make_data(16, 0)
    p = small_params(tiny=TinyLMParams(vocab_size=512, hidden_size=32, layers=1, heads=2, warmup_steps=0),
                     train=_cfg(8))
    texts = [QA.text(c, EOS)[: -len(EOS)] for c in convs]
    base = build_tiny_base("phi", p.tiny, texts, tmp_path / "base", seed=0)
    model = build(p, base)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.compute_dtype == torch.bfloat16 for m in layers)  # what CUDA gets
    data = QADataset(model.tokenizer, emb, convs, p.max_seq_len)
    _one_step(TrainTask("phi2_vlm", model, data, model.collate, optimizer="paged_adamw"), p.train, tmp_path)
    # And the fp32 choice a CPU gets by default.
    p32 = small_params(tiny=p.tiny, train=TrainParams(device="cpu"))
    model32 = build(p32, base)
    assert all(m.compute_dtype == torch.float32 for m in model32.modules() if isinstance(m, bnb.nn.Linear4bit))


@pytest.mark.parametrize("precision", ["fp16", "half"])
def test_unknown_precision_is_a_one_line_error(precision):
    from vlmpipe.core.errors import UserError
    from vlmpipe.core.params import from_dict
    from vlmpipe.ops.preflight import ALL_SECTIONS

    with pytest.raises(UserError, match=r"^siglip\.train\.precision: must be 'auto', 'fp32' or 'bf16'$"):
        from_dict({"siglip": {"train": {"precision": precision}}}, ALL_SECTIONS)
