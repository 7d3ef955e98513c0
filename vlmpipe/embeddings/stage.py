"""The body of precompute_embeddings: embed every image once with a frozen encoder, for the two LM stages."""
from __future__ import annotations

import logging
from pathlib import Path

from vlmpipe.core.io import atomic_path
from vlmpipe.data import features as E
from vlmpipe.data.cifar import load_split
from vlmpipe.data.coco import CocoCaptions
from vlmpipe.models.siglip.model import load_siglip

log = logging.getLogger(__name__)


def embed_all(p, rank: int, device, *, siglip_dir: Path, cifar_root: Path, coco_root: Path, out: Path) -> None:
    """Every CIFAR image through the trained SigLIP tower, every COCO image through ``captioner.vision_encoder``
    (``p``: params with ``embeddings`` and ``captioner``); under torchrun each rank embeds a shard and rank 0 writes."""
    bs, workers = p.embeddings.batch_size, p.embeddings.num_workers
    siglip = load_siglip(siglip_dir, device)
    siglip_id = E.encoder_identity("siglip", siglip.image_tower)
    done = []  # (dataset, split, ids, embeddings, encoder): written together at the end

    for split in ("train", "test"):
        data = load_split(cifar_root, split)
        emb = E.embed_sharded(E.siglip_encoder(siglip, 1), range(len(data)), data.images.__getitem__, bs,
                              desc=f"cifar {split}")  # in memory already: no workers
        done.append(("cifar", split, list(range(len(data))), emb, siglip_id))

    regions, name = p.captioner.regions, p.captioner.vision_encoder
    if name == "siglip":
        fn, ident = E.siglip_encoder(siglip, regions), siglip_id
    else:
        fn, ident = E.clip_encoder(name, regions, device, p.captioner.vision_encoder_revision)
    for split in ("train", "val"):
        coco = CocoCaptions(coco_root, split)
        emb = E.embed_sharded(fn, coco.ids, coco.image, bs, desc=f"coco {split}", num_workers=workers)
        done.append(("coco", split, coco.ids, emb, ident))

    if rank == 0:
        # The four files replace the folder at once: a COCO image that cannot be read (above) leaves the
        # earlier features as they were, not new CIFAR features beside old COCO ones.
        with atomic_path(out) as tmp:
            for dataset, split, ids, emb, enc in done:
                path = E.save(tmp, dataset, split, ids, emb, enc)
                log.info("%s: %s from %s@%s", out / path.name, tuple(emb.shape), enc["name"], enc["hash"])
