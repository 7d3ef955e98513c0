"""The FLOPs model behind MFU (vlmpipe/core/flops.py) against torch's count of what a step executes.

``torch.utils.flop_counter.FlopCounterMode`` counts the matmuls, convolutions and attention a forward
+ backward really runs (autograd skips the weight gradients of frozen layers, so it sees QLoRA's
4N + 2N_lora and a frozen encoder's 2N). The written-down formulas must agree with it within a few
percent: what they leave out (the loss, norms, elementwise work) is that small, and a wrong factor
(a frozen base counted as 6N, attention forgotten, a tied LM head left out) is off by far more.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vlmpipe.core.flops import TransformerCost, conv_net_forward_flops, peak_flops

TOL = 0.06


def _counted(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def _tiny(kind: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=64)
    else:
        cfg = AutoConfig.for_model("phi", hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, vocab_size=300, max_position_embeddings=64)
    cfg._attn_implementation = "eager"  # plain matmuls, which the counter sees on every backend
    return AutoModelForCausalLM.from_config(cfg)


def _lm_step(lm, b: int, t: int):
    # Gradients flow into the input embeddings, as they do into a projector before the LM.
    x = torch.randn(b, t, lm.config.hidden_size, requires_grad=True)
    return lambda: lm(inputs_embeds=x).logits.float().square().mean().backward()


def test_a_trained_transformer_costs_6n_plus_attention_per_token():
    lm = _tiny("gpt2")  # its LM head is tied to the input embedding: it still runs, and counts
    b, t = 3, 40
    want = _counted(_lm_step(lm, b, t))
    got = TransformerCost.of_hf(lm).train_flops(b, t)
    assert got == pytest.approx(want, rel=TOL)


def test_a_frozen_base_with_lora_costs_4n_plus_the_adapters():
    from peft import LoraConfig, get_peft_model

    lm = get_peft_model(_tiny("phi"), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "fc1"]))
    cost = TransformerCost.of_hf(lm)
    assert 0 < cost.n_trainable < cost.n_all / 5
    b, t = 2, 48
    want = _counted(_lm_step(lm, b, t))
    assert cost.train_flops(b, t) == pytest.approx(want, rel=TOL)
    # Counting the frozen base as trained (6N) would be far off: the check has teeth.
    six_n = TransformerCost(cost.n_all, cost.n_all, cost.layers, cost.d_model).train_flops(b, t)
    assert six_n > 1.3 * want


def test_a_prefix_lm_counts_its_head_on_the_target_positions_only():
    """The prefix LMs run the LM head on the loss's targets alone (vlmpipe/models/lm/prefix_lm.py): the
    formula counts it there, and counting it on every position would be off by more than the tolerance."""
    from vlmpipe.models.lm.collate import IGNORE_INDEX
    from vlmpipe.models.lm.prefix_lm import PrefixLM, PrefixLMConfig
    from vlmpipe.models.lm.projector import PrefixProjector

    lm = _tiny("gpt2")
    config = PrefixLMConfig(kind="captioner", lm_source="tiny", lm_revision=None, feature_dim=32, regions=1,
                            prefix_tokens=4, max_new_tokens=4, num_beams=1)
    model = PrefixLM(lm, PrefixProjector(32, 1, 4, lm.config.hidden_size), None, config)
    b, t = 3, 40
    labels = torch.full((b, t), IGNORE_INDEX)
    labels[:, -5:] = torch.randint(lm.config.vocab_size, (b, 5))  # a short answer after a long prompt
    batch = {"feats": torch.randn(b, 1, 32), "input_ids": torch.randint(lm.config.vocab_size, (b, t)),
             "attention_mask": torch.ones(b, t, dtype=torch.long), "labels": labels}
    want = _counted(lambda: model(batch)["loss"].backward())
    assert model.train_flops(batch) == pytest.approx(want, rel=TOL)
    every_position = model.train_flops(batch) - model._lm_cost.train_flops(b, 4 + t, head_rows=b * 5) \
        + model._lm_cost.train_flops(b, 4 + t)
    assert every_position > (1 + 2 * TOL) * want


def test_siglip_step_flops_match_the_executed_count():
    from vlmpipe.models.siglip.model import build_siglip
    from vlmpipe.siglip.params import SiglipParams

    p = SiglipParams(embed_dim=32, text_width=32, text_layers=2, text_vocab_size=512, image_size=32)
    torch.manual_seed(0)
    model = build_siglip(p, ["a red circle", "a blue square in the top left", "three shapes"] * 20).train()
    n = 8
    texts = model.tokenize([f"a red circle and {i} blue squares in the top left" for i in range(n)])
    batch = {"images": torch.randint(0, 255, (n, 32, 32, 3), dtype=torch.uint8), **texts, "text_ids": torch.arange(n)}
    want = _counted(lambda: model(batch)["loss"].backward())
    assert model.train_flops(batch) == pytest.approx(want, rel=TOL)


def test_resnet50_forward_flops_are_the_published_figure():
    """torchvision's ResNet-50 at 224 px: 4.09 GMACs, i.e. 8.2 GFLOPs per image forward."""
    from torchvision.models import resnet50

    flops = conv_net_forward_flops(resnet50(), torch.zeros(1, 3, 224, 224))
    assert flops == pytest.approx(2 * 4.09e9, rel=0.01)


def test_cpu_peak_is_calibrated_once_per_machine_and_shared(tmp_path, monkeypatch):
    """The first stage to need the CPU's peak measures it and keeps it; every later process reads the same
    figure without measuring, so every stage of a run divides by one peak."""
    from vlmpipe.core import flops

    monkeypatch.setenv("VLMPIPE_PEAK_FILE", str(tmp_path / "peak.json"))
    monkeypatch.setattr(flops, "_cpu_peak_cache", {})
    peak, source = peak_flops(torch.device("cpu"), torch.float32)
    assert source.startswith("calibrated float32 GEMM") and math.isfinite(peak)
    assert 1e9 < peak < 1e14  # a GEMM on 1-64 cores: between a GFLOP/s and 100 TFLOP/s
    table = json.loads((tmp_path / "peak.json").read_text())
    assert [v["flops"] for v in table.values()] == [peak]

    def no_measuring(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(flops, "_cpu_peak_cache", {})  # as a new process
    monkeypatch.setattr(flops, "measure_cpu_gemm", no_measuring)
    assert peak_flops(torch.device("cpu"), torch.float32) == (peak, source)
    # Another precision is another entry; the first is kept.
    monkeypatch.setattr(flops, "measure_cpu_gemm", lambda dtype: 5e11)
    assert peak_flops(torch.device("cpu"), torch.bfloat16)[0] == 5e11
    assert sorted(v["flops"] for v in json.loads((tmp_path / "peak.json").read_text()).values()) == sorted([peak, 5e11])


def test_cpu_peak_in_an_unwritable_place_is_measured_and_said(tmp_path, monkeypatch, caplog):
    from vlmpipe.core import flops

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("VLMPIPE_PEAK_FILE", str(tmp_path / "file" / "peak.json"))  # its folder is a file
    monkeypatch.setattr(flops, "_cpu_peak_cache", {})
    monkeypatch.setattr(flops, "measure_cpu_gemm", lambda dtype: 7e10)
    with caplog.at_level("WARNING"):
        assert peak_flops(torch.device("cpu"), torch.float32) == (7e10, "measured float32 GEMM, "
                                                                  f"{torch.get_num_threads()} threads, this process only")
    assert "CPU peak not kept" in caplog.text
