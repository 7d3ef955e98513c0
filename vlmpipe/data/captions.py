"""Captions as training examples for the captioner.

Every reference caption is a sample: an image with five captions gives five samples, each
pairing the image's cached features with one caption. A caption is tokenized without special
tokens, cut to ``max_caption_tokens - 1`` tokens and followed by the EOS id, so every target
ends in EOS and generation learns to stop. All its tokens are targets (the prefix is added by
the model, outside the text). Shuffling is the training loop's.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch

from vlmpipe.data import features as embeddings
from vlmpipe.data.coco import CocoCaptions
from vlmpipe.core.errors import UserError


def encode_captions(tokenizer, captions: Sequence[str], max_caption_tokens: int) -> list[list[int]]:
    """Token ids of each caption (no special tokens), cut to ``max_caption_tokens - 1``, + EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token")
    texts = [c.strip() for c in captions]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [list(t[: max_caption_tokens - 1]) + [eos] for t in ids]


class CaptionDataset(torch.utils.data.Dataset):
    """One sample per (image, reference caption): ``{"feats": [R, D], "input_ids", "labels"}``.

    ``feats`` is the cached feature tensor [N, R, D] (any float dtype, kept as is: float16 from
    the cache is converted per batch), ``captions[i]`` the reference captions of image ``i``.
    """

    def __init__(self, feats: torch.Tensor, captions: Sequence[Sequence[str]], tokenizer,
                 max_caption_tokens: int) -> None:
        if len(feats) != len(captions):
            raise ValueError(f"{len(feats)} feature rows but {len(captions)} caption lists")
        self.feats = feats if feats.dim() == 3 else feats.unsqueeze(1)
        flat = [c for caps in captions for c in caps]
        owner = [i for i, caps in enumerate(captions) for _ in caps]
        self.items = list(zip(owner, encode_captions(tokenizer, flat, max_caption_tokens)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        img, ids = self.items[i]
        return {"feats": self.feats[img], "input_ids": ids, "labels": ids}

    def num_tokens(self) -> int:
        return sum(len(ids) for _, ids in self.items)


def caption_split(coco_root: str | os.PathLike, embeddings_root: str | os.PathLike, split: str,
                  encoder: Mapping[str, str] | None, regions: int
                  ) -> tuple[list[int], torch.Tensor, list[list[str]], dict]:
    """Image ids, cached features [N, R, D] of a COCO split, the reference captions of each image,
    and the encoder identity. ``encoder`` ({"name", "hash"}): a cache made by another one is refused."""
    cache = embeddings.load(embeddings_root, "coco", split, expect_encoder=dict(encoder) if encoder else None)
    feats = torch.as_tensor(cache.embeddings)
    if feats.dim() != 3 or feats.shape[1] != regions:
        raise UserError(f"{embeddings_root}: coco_{split} has features of shape {tuple(feats.shape)}, expected "
                        f"[N, {regions}, D] (captioner.regions); rerun `dvc repro precompute_embeddings`")
    coco = CocoCaptions(coco_root, split)
    known = set(coco.ids)
    ids = [int(i) for i in cache.ids]
    missing = [i for i in ids if i not in known]
    if missing:
        raise UserError(f"{embeddings_root}: coco_{split} has features of {len(missing)} images absent from "
                        f"{coco_root} (e.g. id {missing[0]}); rerun `dvc repro precompute_embeddings`")
    return ids, feats, [coco.captions(i) for i in ids], dict(cache.encoder)
