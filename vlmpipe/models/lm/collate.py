"""The batches of the prefix language models (QA model, captioner, chat model): padded or packed.

An example is ``{"feats": [R, D] (or [D]), "input_ids": [T], "labels": [T]}``: the cached
image features, the text tokens, and per token its target id or ``IGNORE_INDEX`` (the loss
is taken on targets only — answers and captions with their EOS, never questions or padding).

- ``pad_collate``: one example a row, padded on the right to the longest text (dynamic padding,
  never a fixed length); what evaluation reads, row by row.
- ``pack_collate``: what training reads. Several examples share a row, each as its own sequence
  ``[prefix][text]``, so a batch carries little padding. Captions and conversations vary in length
  (offline default: 14.5 caption tokens on average, the longest 27; conversations 97 and 180), and
  padded to the longest a third of every training step computed padding. Packed, each sequence
  is told apart by its position ids, which restart at 0 where it starts: Hugging Face's causal LMs
  then attend within each sequence only (``find_packed_sequence_indices`` for sdpa and eager,
  varlen kernels for FlashAttention-2). The loss and its gradients are those of the padded batch
  (``tests/test_packing.py``).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

IGNORE_INDEX = -100


def pad_collate(examples: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """``feats`` float32 [B, R, D]; ``input_ids``, ``labels``, ``attention_mask`` int64 [B, T]; ``has_image``
    bool [B] when an example says it has none (a text-only conversation)."""
    if not examples:
        raise ValueError("pad_collate: empty batch")
    b, longest = len(examples), max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((b, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((b, longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, longest), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(e["labels"], dtype=torch.long)
        mask[i, :n] = 1
    feats = torch.stack([torch.as_tensor(e["feats"]) for e in examples]).float()
    if feats.dim() == 2:  # [B, D]: one pooled vector per image
        feats = feats.unsqueeze(1)
    batch = {"feats": feats, "input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if any("has_image" in e for e in examples):  # text-only examples (chat data): their prefix is masked out
        batch["has_image"] = torch.tensor([bool(e.get("has_image", True)) for e in examples])
    return batch


def pack_collate(examples: Sequence[Mapping[str, Any]], pad_token_id: int, prefix_tokens: int,
                 cost: Callable[[int, int], float] | None = None, one_row: bool = False) -> dict[str, torch.Tensor]:
    """The examples packed first-fit decreasing into rows, each sequence whole in one row. The rows are as
    wide as the longest sequence or twice that, whichever ``cost(rows, width)`` (an LM's training FLOPs)
    finds cheaper: wider rows carry less padding but pay more for attention, which spans the row (on a
    2-core CPU 3 or 4 times as wide was slower still, more than the FLOPs say). Without ``cost``: as wide
    as the longest sequence. ``one_row``: every sequence in one row, no padding at all
    (FlashAttention-2's varlen kernel attends within each sequence, and only in a batch of one row);
    ``sequence_lengths`` then gives each sequence's positions, in the row's order.

    Keys: ``feats`` [B, R, D] (example order); ``input_ids``, ``labels``, ``position_ids`` int64 [rows, W],
    the labels at their tokens' own positions (the prefix slots hold padding ids and no label);
    ``prefix_at`` int64 [B' * K]: the flat positions (row * W + column) of the prefix slots of the B'
    examples with an image, in example order; ``text_tokens``: the text tokens in all; ``has_image`` as
    in ``pad_collate``.

    A text-only example has no prefix slots; its text keeps the positions it has after a prefix (as in a
    padded row, where the prefix is masked out), and its first token, which nothing before it predicts,
    carries no label. Each padding position is a sequence of its own (position 0), attended by nothing."""
    if not examples:
        raise ValueError("pack_collate: empty batch")
    k = prefix_tokens
    lengths = [len(e["input_ids"]) for e in examples]
    image = [bool(e.get("has_image", True)) for e in examples]
    span = [n + k if im else n for n, im in zip(lengths, image)]
    if one_row:
        if not all(image):  # its positions do not restart at 0: a varlen kernel would join it to the one before
            raise ValueError("pack_collate: a text-only example cannot share a one-row batch")
        width, rows = sum(span), [list(range(len(examples)))]
    else:
        layouts = [(width, _first_fit(span, width)) for width in
                   ([max(span) * m for m in (1, 2)] if cost is not None else [max(span)])]
        width, rows = min(layouts, key=lambda wr: cost(len(wr[1]), wr[0])) if cost is not None else layouts[0]
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    prefix_at: list[torch.Tensor | None] = [None] * len(examples)
    for r, members in enumerate(rows):
        col = 0
        for i in members:
            n, e = lengths[i], examples[i]
            text = col + k if image[i] else col
            input_ids[r, text:text + n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
            labels[r, text:text + n] = torch.as_tensor(e["labels"], dtype=torch.long)
            if image[i]:
                prefix_at[i] = r * width + col + torch.arange(k)
                positions[r, col:col + span[i]] = torch.arange(k + n)
            else:
                labels[r, text] = IGNORE_INDEX
                positions[r, col:col + n] = torch.arange(k, k + n)
            col += span[i]
    feats = torch.stack([torch.as_tensor(e["feats"]) for e in examples]).float()
    if feats.dim() == 2:
        feats = feats.unsqueeze(1)
    slots = [p for p in prefix_at if p is not None]
    batch = {"feats": feats, "input_ids": input_ids, "labels": labels, "position_ids": positions,
             "prefix_at": torch.cat(slots) if slots else torch.zeros(0, dtype=torch.long),
             "text_tokens": torch.tensor(sum(lengths))}
    if not all(image):
        batch["has_image"] = torch.tensor(image)
    if one_row:
        batch["sequence_lengths"] = torch.tensor(span)
    return batch


def _first_fit(span: Sequence[int], width: int) -> list[list[int]]:
    """First-fit decreasing: the indices of ``span`` in rows of ``width``, longest first (ties in order)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(span)), key=lambda i: -span[i]):
        r = next((r for r, free in enumerate(room) if span[i] <= free), None)
        if r is None:
            rows.append([])
            room.append(width)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= span[i]
    return rows
