"""precompute_embeddings: embed every image once with a frozen encoder, for the two LM stages.

Reads:  models/siglip (the trained SigLIP), data/cifar, data/coco, params
        ``embeddings.*``, ``captioner.vision_encoder`` and ``captioner.regions``.
Writes: data/embeddings/{cifar_train,cifar_test}.safetensors (SigLIP image tower,
        one region) and data/embeddings/{coco_train,coco_val}.safetensors
        (``captioner.vision_encoder``: "siglip", or a CLIP hub id/path whose pooled
        output is used; ``captioner.regions`` = 1 whole image, or 5 = whole image +
        four quadrants). Float16, keyed by image id, tagged with the encoder identity.

Under ``torchrun`` each rank embeds a shard and rank 0 writes.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On this shared 2-core
# machine, spinning threads fighting other processes made a 2-thread run ~10x slower than
# 1 thread (measured: 25 vs 300 images/s for the tower at load average 8; passive: 230).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from vlmpipe import embeddings as E  # noqa: E402
from vlmpipe.data.cifar import load_split  # noqa: E402
from vlmpipe.data.coco import CocoCaptions  # noqa: E402
from vlmpipe.errors import stage_entry  # noqa: E402
from vlmpipe.models.siglip import load_siglip  # noqa: E402
from vlmpipe.params import flatten, load_params, to_dict  # noqa: E402
from vlmpipe.sources import preflight  # noqa: E402
from vlmpipe.tracking import stage_run  # noqa: E402
from vlmpipe.train import setup_distributed, shutdown_distributed  # noqa: E402

SIGLIP, CIFAR, COCO, OUT = Path("models/siglip"), Path("data/cifar"), Path("data/coco"), Path("data/embeddings")
log = logging.getLogger("precompute_embeddings")


@stage_entry
def main() -> None:
    t0 = time.perf_counter()
    p = load_params()
    preflight("precompute_embeddings", p)  # anything this or a later stage cannot fetch: one line now
    rank, world, device = setup_distributed(p.embeddings.device, "embeddings.device")
    params = {**flatten({"embeddings": to_dict(p.embeddings)}),
              "captioner.vision_encoder": p.captioner.vision_encoder,
              "captioner.vision_encoder_revision": p.captioner.vision_encoder_revision,
              "captioner.regions": p.captioner.regions}
    with stage_run("precompute_embeddings", params, enabled=rank == 0):
        _embed_all(p, rank, device)
    if rank == 0:
        log.info("precompute_embeddings done in %.0fs (%d ranks)", time.perf_counter() - t0, world)
    shutdown_distributed()


def _embed_all(p, rank: int, device) -> None:
    bs, workers = p.embeddings.batch_size, p.embeddings.num_workers
    siglip = load_siglip(SIGLIP, device)
    siglip_id = E.encoder_identity("siglip", siglip.image_tower)

    for split in ("train", "test"):
        data = load_split(CIFAR, split)
        emb = E.embed_sharded(E.siglip_encoder(siglip, 1), range(len(data)), data.images.__getitem__, bs,
                              desc=f"cifar {split}")  # in memory already: no workers
        if rank == 0:
            path = E.save(OUT, "cifar", split, list(range(len(data))), emb, siglip_id)
            log.info("%s: %s from %s@%s", path, tuple(emb.shape), siglip_id["name"], siglip_id["hash"])

    regions, name = p.captioner.regions, p.captioner.vision_encoder
    if name == "siglip":
        fn, ident = E.siglip_encoder(siglip, regions), siglip_id
    else:
        fn, ident = E.clip_encoder(name, regions, device, p.captioner.vision_encoder_revision)
    for split in ("train", "val"):
        coco = CocoCaptions(COCO, split)
        emb = E.embed_sharded(fn, coco.ids, coco.image, bs, desc=f"coco {split}", num_workers=workers)
        if rank == 0:
            path = E.save(OUT, "coco", split, coco.ids, emb, ident)
            log.info("%s: %s from %s@%s", path, tuple(emb.shape), ident["name"], ident["hash"])


if __name__ == "__main__":
    raise SystemExit(main())
