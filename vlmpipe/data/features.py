"""Cached image embeddings: one safetensors file per (dataset, split) in ``data/embeddings/``.

File ``<root>/<dataset>_<split>.safetensors`` (``cifar_train``, ``cifar_test``,
``coco_train``, ``coco_val``) holds

- ``ids``: int64 [N], the image ids (CIFAR: index in the split; COCO: image id);
- ``embeddings``: float16 [N, R, D], R regions per image (1: the whole image;
  5: the whole image + its four quadrants, in reading order);

and metadata recording the encoder identity (its name and a hash of its
weights) and R. ``load(..., expect_encoder=identity)`` refuses a file made by
another encoder, so a stale cache is never used::

    ident = siglip_identity("models/siglip")
    emb = load("data/embeddings", "cifar", "train", expect_encoder=ident)
    emb.embeddings[emb.row(image_id)]   # [R, D] float16
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from vlmpipe.core.errors import UserError
from vlmpipe.core.io import atomic_path

FORMAT = "vlmpipe-embeddings-v1"


@dataclass
class Embeddings:
    ids: torch.Tensor         # int64 [N]
    embeddings: torch.Tensor  # float16 [N, R, D]
    encoder: dict             # {"name": ..., "hash": ...}
    regions: int

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, image_id: int) -> int:
        if not hasattr(self, "_index"):
            self._index = {int(i): k for k, i in enumerate(self.ids.tolist())}
        return self._index[int(image_id)]


# ---------------------------------------------------------------- identity


def weights_hash(state: dict[str, torch.Tensor] | nn.Module) -> str:
    """sha256 (16 hex digits) over names, dtypes, shapes and bytes of a state dict."""
    if isinstance(state, nn.Module):
        state = state.state_dict()
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def encoder_identity(name: str, module: nn.Module) -> dict:
    return {"name": name, "hash": weights_hash(module)}


def siglip_identity(model_dir: str | os.PathLike) -> dict:
    """Identity of a saved SigLIP's image tower, read from its file (equals
    ``encoder_identity("siglip", load_siglip(model_dir).image_tower)``)."""
    from vlmpipe.core.io import read_safetensors

    f = Path(model_dir) / "model.safetensors"
    if not f.exists():
        raise UserError(f"{model_dir}: no trained SigLIP (no model.safetensors); run `dvc repro train_siglip`")
    state = read_safetensors(f, "run `dvc repro train_siglip`")
    return {"name": "siglip", "hash": weights_hash({k[len("image_tower."):]: v for k, v in state.items()
                                                     if k.startswith("image_tower.")})}


# ---------------------------------------------------------------- files


def path_for(root: str | os.PathLike, dataset: str, split: str) -> Path:
    return Path(root) / f"{dataset}_{split}.safetensors"


def save(root: str | os.PathLike, dataset: str, split: str, ids: Sequence[int] | torch.Tensor,
         embeddings: torch.Tensor, encoder: dict) -> Path:
    """Write one (dataset, split) file atomically; ``embeddings`` [N, R, D] (or [N, D] for R = 1)."""
    ids = torch.as_tensor(ids, dtype=torch.int64)
    emb = embeddings.detach().cpu()
    if emb.dim() == 2:
        emb = emb[:, None, :]
    if emb.dim() != 3 or emb.shape[0] != len(ids):
        raise ValueError(f"embeddings must be [N, R, D] with N = {len(ids)} ids, got {tuple(emb.shape)}")
    if len(set(ids.tolist())) != len(ids):
        raise ValueError("image ids must be unique")
    dest = path_for(root, dataset, split)
    meta = {"format": FORMAT, "encoder_name": str(encoder["name"]), "encoder_hash": str(encoder["hash"]),
            "regions": str(emb.shape[1]), "dim": str(emb.shape[2]), "dataset": dataset, "split": split}
    if encoder.get("revision"):  # the hub commit of a hub encoder
        meta["encoder_revision"] = str(encoder["revision"])
    with atomic_path(dest) as tmp:
        # One metadata entry holding sorted JSON: safetensors writes several entries in hash-map
        # order, which differs between runs, so identical embeddings got a different file hash
        # and DVC saw a changed output on every fresh run.
        save_file({"ids": ids.contiguous(), "embeddings": emb.to(torch.float16).contiguous()}, str(tmp),
                  metadata={"vlmpipe": json.dumps(meta, sort_keys=True)})
    return dest


def load(root: str | os.PathLike, dataset: str, split: str, expect_encoder: dict | None = None) -> Embeddings:
    """Read one file; with ``expect_encoder`` ({"name", "hash"}) a file made by another encoder is a UserError."""
    path = path_for(root, dataset, split)
    if not path.exists():
        raise UserError(f"{path}: no cached embeddings (run `dvc repro precompute_embeddings`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            meta = json.loads(meta["vlmpipe"]) if "vlmpipe" in meta else meta  # earlier files: flat entries
            ids, emb = f.get_tensor("ids"), f.get_tensor("embeddings")
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's stale/corrupt cache
        raise UserError(f"{path}: unreadable embeddings file ({str(e).splitlines()[0][:200]})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a vlmpipe embeddings file (format {meta.get('format')!r})")
    encoder = {"name": meta["encoder_name"], "hash": meta["encoder_hash"]}
    if meta.get("encoder_revision"):
        encoder["revision"] = meta["encoder_revision"]
    if expect_encoder is not None and (encoder["name"], encoder["hash"]) != (expect_encoder["name"], expect_encoder["hash"]):
        raise UserError(f"{path}: made by encoder {encoder['name']}@{encoder['hash']}, expected "
                        f"{expect_encoder['name']}@{expect_encoder['hash']}: a stale cache "
                        f"(run `dvc repro precompute_embeddings`)")
    return Embeddings(ids=ids, embeddings=emb, encoder=encoder, regions=int(meta["regions"]))


def features_for(root: str | os.PathLike, dataset: str, split: str, ids: Sequence[int], encoder: dict,
                 where: str | os.PathLike) -> torch.Tensor:
    """Cached features [len(ids), R, D] of the images ``ids`` (in that order), made by ``encoder``;
    ``where`` (the file that names the ids, e.g. the Q/A CSV) is named when one is missing."""
    cache = load(root, dataset, split, expect_encoder=dict(encoder))
    emb = torch.as_tensor(cache.embeddings)
    if emb.dim() == 2:
        emb = emb.unsqueeze(1)
    pos = {int(i): n for n, i in enumerate(torch.as_tensor(cache.ids).tolist())}
    missing = [i for i in ids if i not in pos]
    if missing:
        raise UserError(f"{where}: {len(missing)} {split} rows have no cached image features in "
                        f"{path_for(root, dataset, split)} (e.g. id {missing[0]}); rerun `dvc repro precompute_embeddings`")
    return emb[torch.as_tensor([pos[i] for i in ids], dtype=torch.long)]


def cifar_features(root: str | os.PathLike, splits: Sequence[str], ids: Sequence[int], encoder: dict,
                   where: str | os.PathLike) -> torch.Tensor:
    """``features_for`` of CIFAR images ``ids``, each in its own split ``splits[k]`` (a Q/A CSV's
    training or held-out rows may index either split), in that order."""
    names = list(dict.fromkeys(splits))
    if len(names) == 1:
        return features_for(root, "cifar", names[0], ids, encoder, where)
    rows = {s: [k for k, x in enumerate(splits) if x == s] for s in names}
    feats = torch.cat([features_for(root, "cifar", s, [ids[k] for k in rows[s]], encoder, where) for s in names])
    order = torch.as_tensor([k for s in names for k in rows[s]], dtype=torch.long)
    return feats[torch.argsort(order)]


# ---------------------------------------------------------------- computing


def embed_images(encoder_fn: Callable[[list], torch.Tensor], images: Iterable, batch_size: int,
                 total: int | None = None, desc: str = "embed", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``encoder_fn(list of images) -> [b, ...]`` over ``images`` in batches, without gradients."""
    return _embed_batches(encoder_fn, _batched(images, batch_size), total, desc, dtype)


def _batched(items: Iterable, size: int) -> Iterator[list]:
    buf = []
    for x in items:
        buf.append(x)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def _embed_batches(encoder_fn, batches: Iterable[list], total: int | None, desc: str, dtype: torch.dtype) -> torch.Tensor:
    out = []
    with torch.no_grad(), tqdm(total=total, desc=desc, unit="img", mininterval=1.0, dynamic_ncols=True) as bar:
        for buf in batches:
            out.append(encoder_fn(buf).detach().cpu().to(dtype))
            bar.update(len(buf))
    if not out:
        raise ValueError("no images to embed")
    return torch.cat(out)


class _Images(torch.utils.data.Dataset):
    def __init__(self, get_image: Callable[[int], object], ids: Sequence[int]) -> None:
        self.get_image, self.ids = get_image, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.get_image(self.ids[i])


def embed_sharded(encoder_fn: Callable[[list], torch.Tensor], ids: Sequence[int], get_image: Callable[[int], object],
                  batch_size: int, desc: str, dtype: torch.dtype = torch.float16, num_workers: int = 0) -> torch.Tensor:
    """Embeddings of ``get_image(id)`` for every id, in ``ids`` order. Under torchrun each rank embeds
    ids[rank::world] and every rank receives the full result (rank 0 writes it). ``num_workers`` > 0
    reads and decodes the images (JPEGs from the COCO zips) in that many worker processes, in order."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    mine = list(ids)[rank::world]
    if num_workers > 0:
        batches: Iterable[list] = torch.utils.data.DataLoader(_Images(get_image, mine), batch_size=batch_size,
                                                              num_workers=num_workers, collate_fn=list)
    else:
        batches = _batched((get_image(i) for i in mine), batch_size)
    emb = _embed_batches(encoder_fn, batches, len(mine), desc if world == 1 else f"{desc} [rank {rank}]", dtype)
    if world == 1:
        return emb
    parts: list = [None] * world
    dist.all_gather_object(parts, emb)
    full = torch.empty((len(ids), *emb.shape[1:]), dtype=emb.dtype)
    for r, part in enumerate(parts):
        full[r::world] = part
    return full


def _pil(img):
    from PIL import Image

    return img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, dtype=np.uint8))


def region_crops(img, regions: int) -> list:
    """The whole image, then (regions == 5) its four quadrants in reading order, as PIL images."""
    img = _pil(img).convert("RGB")
    if regions == 1:
        return [img]
    w, h = img.size
    return [img] + [img.crop((x0, y0, x1, y1)) for (y0, y1) in ((0, h // 2), (h // 2, h))
                    for (x0, x1) in ((0, w // 2), (w // 2, w))]


def siglip_encoder(model, regions: int) -> Callable[[list], torch.Tensor]:
    """images (PIL / uint8 HxWx3) -> [b, R, D] with a trained SigLIP image tower (eval mode). Each crop is
    resized by the model's own ``preprocess``, as its training batches were."""
    def fn(images: list) -> torch.Tensor:
        crops = [c for img in images for c in region_crops(img, regions)]
        return model.encode_images(crops).view(len(images), regions, -1)
    return fn


def clip_encoder(name: str, regions: int, device: torch.device, revision: str = "main",
                 key: str = "captioner.vision_encoder") -> tuple[Callable[[list], torch.Tensor], dict]:
    """A frozen CLIP vision tower (hub id at ``revision``, or a path): its pooled output (768-d for
    ViT-B/16) per region. The identity records the weights hash and the hub commit."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    from vlmpipe.core import hub

    model = hub.load(CLIPVisionModel, name, revision, key).to(device).eval()
    commit = hub.resolved_commit(name, revision)
    processor = hub.load(CLIPImageProcessor, name, commit or revision, key)

    def fn(images: list) -> torch.Tensor:
        crops = [c for img in images for c in region_crops(img, regions)]
        pixels = processor(images=crops, return_tensors="pt")["pixel_values"].to(device)
        return model(pixel_values=pixels).pooler_output.float().view(len(images), regions, -1)
    ident = encoder_identity(name, model)
    if commit:
        ident["revision"] = commit
    return fn, ident
