"""The one padding collate of the two prefix language models (QA model and captioner).

An example is ``{"feats": [R, D] (or [D]), "input_ids": [T], "labels": [T]}``: the cached
image features, the text tokens, and per token its target id or ``IGNORE_INDEX`` (the loss
is taken on targets only — answers and captions with their EOS, never questions or padding).
Batches are padded on the right to their longest text (dynamic padding, never a fixed length).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

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
