"""Packed training batches (``pack_collate``): every example whole in one row, its own positions, its
prefix slots where ``prefix_at`` says, and rows as wide as the cost says is cheapest.

That the packed loss and gradients equal the padded batch's is tested per model with
``assert_packed_equals_padded``: the captioner (tests/test_captioner.py), the chat model with a text-only
conversation (tests/test_chat.py) and the 4-bit QA model under PEFT (tests/test_phi_vlm.py).
"""
from __future__ import annotations

import pytest
import torch

from vlmpipe.models.lm.collate import IGNORE_INDEX, pack_collate

K, PAD = 3, 0


def assert_packed_equals_padded(model, examples) -> None:
    """``model.pack(examples)`` packs them into fewer rows than ``model.collate`` pads them to, and gives
    the same loss, counts and gradients (those of every parameter that gets one)."""
    model.train()
    runs = []
    for batch in (model.collate(examples), model.pack(examples)):
        model.zero_grad()
        out = model(batch)
        out["loss"].backward()
        grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
        runs.append((out, grads, batch["input_ids"].shape[0]))
    (padded, padded_grads, padded_rows), (packed, packed_grads, packed_rows) = runs
    assert packed_rows < padded_rows == len(examples)
    torch.testing.assert_close(packed["loss"], padded["loss"])
    for k in ("samples", "tokens", "targets"):
        assert int(packed[k]) == int(padded[k]), k
    assert packed_grads.keys() == padded_grads.keys() and packed_grads
    for n in packed_grads:
        torch.testing.assert_close(packed_grads[n], padded_grads[n], rtol=1e-4, atol=1e-6)


def _examples(lengths, text_only=()):
    """Example i: tokens 100*i+1 .. 100*i+n, the second half labelled (as answers are)."""
    out = []
    for i, n in enumerate(lengths):
        ids = [100 * i + t + 1 for t in range(n)]
        e = {"feats": torch.full((2, 4), float(i)), "input_ids": ids,
             "labels": [IGNORE_INDEX] * (n // 2) + ids[n // 2:]}
        if i in text_only:
            e["has_image"] = False
        out.append(e)
    return out


def _where(batch, first_token):
    """(row, column) of the token ``first_token``."""
    r, c = (batch["input_ids"] == first_token).nonzero(as_tuple=True)
    assert len(r) == 1
    return int(r[0]), int(c[0])


def test_each_example_sits_whole_in_one_row_after_its_prefix_slots():
    lengths = [9, 2, 5, 7, 3, 1, 6]
    ex = _examples(lengths)
    b = pack_collate(ex, PAD, K)
    rows, width = b["input_ids"].shape
    assert width == max(lengths) + K and rows < len(ex)  # nothing cut; fewer rows than examples
    assert int(b["text_tokens"]) == sum(lengths) and torch.equal(b["feats"][:, 0, 0], torch.arange(7.0))
    slots = b["prefix_at"].view(len(ex), K)
    for i, n in enumerate(lengths):
        r, c = _where(b, 100 * i + 1)
        assert b["input_ids"][r, c:c + n].tolist() == ex[i]["input_ids"]
        assert b["labels"][r, c:c + n].tolist() == ex[i]["labels"]
        assert b["position_ids"][r, c - K:c + n].tolist() == list(range(K + n))  # restarting at its prefix
        assert slots[i].tolist() == [r * width + c - K + j for j in range(K)]
        assert (b["input_ids"][r, c - K:c] == PAD).all() and (b["labels"][r, c - K:c] == IGNORE_INDEX).all()
    # What no example fills is padding: no label, position 0 (a sequence of its own).
    used = torch.zeros_like(b["input_ids"], dtype=torch.bool).view(-1)
    used[b["prefix_at"]] = True
    used = used.view(rows, width) | (b["input_ids"] != PAD)
    assert int(used.sum()) == sum(lengths) + K * len(lengths)
    assert (b["labels"][~used] == IGNORE_INDEX).all() and (b["position_ids"][~used] == 0).all()


def test_a_text_only_example_has_no_prefix_slots_and_keeps_its_positions_after_one():
    ex = _examples([4, 6, 2], text_only={1})
    b = pack_collate(ex, PAD, K)
    assert b["has_image"].tolist() == [True, False, True] and len(b["prefix_at"]) == 2 * K
    r, c = _where(b, 101)
    assert b["position_ids"][r, c:c + 6].tolist() == list(range(K, K + 6))
    assert b["labels"][r, c] == IGNORE_INDEX  # nothing before it predicts its first token
    assert "has_image" not in pack_collate(_examples([4, 6]), PAD, K)


@pytest.mark.parametrize("per_row, factor", [(1.0, 2), (0.0, 1)])
def test_the_rows_are_as_wide_as_the_cost_finds_cheapest(per_row, factor):
    """Rows twice the longest sequence where a row costs more than its width (fewer rows), as wide as the
    longest where width costs more."""
    ex = _examples([5, 5, 5, 5, 4, 4])
    cost = lambda rows, width: per_row * 1000 * rows + width  # noqa: E731
    b = pack_collate(ex, PAD, K, cost=cost)
    assert b["input_ids"].shape[1] == factor * (5 + K)
    assert b["input_ids"].shape[0] == (3 if factor == 2 else 6)  # two sequences a row, or one


def test_an_empty_batch_is_an_error():
    with pytest.raises(ValueError, match="empty batch"):
        pack_collate([], PAD, K)


def test_one_row_holds_every_sequence_without_padding_for_a_varlen_kernel():
    """FlashAttention-2 splits a batch into sequences only when it is one row (where positions restart at
    0): every sequence in that row, no padding, their lengths given; a text-only example has no place."""
    lengths = [4, 7, 2]
    b = pack_collate(_examples(lengths), PAD, K, one_row=True)
    assert b["input_ids"].shape == (1, sum(lengths) + K * len(lengths))
    assert b["sequence_lengths"].tolist() == [n + K for n in lengths]
    starts = (b["position_ids"][0] == 0).nonzero().view(-1).tolist()
    assert starts == [0, 4 + K, 4 + K + 7 + K]  # a sequence at each restart, in example order
    with pytest.raises(ValueError, match="text-only"):
        pack_collate(_examples(lengths, text_only={1}), PAD, K, one_row=True)


def test_a_flash_attention_lm_packs_one_row_and_counts_attention_within_each_sequence(monkeypatch):
    """``PrefixLM.pack`` under FlashAttention-2: one row; ``train_flops`` counts each sequence's attention
    over that sequence, not over the row (what the varlen kernel computes)."""
    from types import SimpleNamespace

    from vlmpipe.core.flops import TransformerCost
    from vlmpipe.models.lm.prefix_lm import PrefixLM

    cost = TransformerCost(n_all=1000, n_trainable=1000, layers=2, d_model=16, n_head=100)
    model = SimpleNamespace(lm=SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2")),
                            pad_token_id=PAD, config=SimpleNamespace(prefix_tokens=K, regions=2),
                            projector=torch.nn.Linear(4, 4), _lm_cost=cost, _split_head=lambda: True)
    model._attention = PrefixLM._attention.fget(model)
    batch = PrefixLM.pack(model, _examples([4, 7, 2]))
    assert batch["input_ids"].shape[0] == 1
    targets = int((batch["labels"] != IGNORE_INDEX).sum())
    per_sequence = sum(cost.train_flops(1, n, head_rows=0) for n in (4 + K, 7 + K, 2 + K))
    projector = 6 * 3 * 2 * 16
    assert PrefixLM.train_flops(model, batch) == projector + per_sequence + cost.train_flops(0, 0, head_rows=targets)
    assert PrefixLM.train_flops(model, batch) < projector + cost.train_flops(1, batch["input_ids"].shape[1],
                                                                              head_rows=targets)
