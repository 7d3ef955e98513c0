"""precompute_embeddings: every image embedded once by a frozen encoder, for the two LM stages.

Reads models/siglip, data/cifar, data/coco, params ``embeddings`` and ``captioner.vision_encoder``,
``captioner.vision_encoder_revision``, ``captioner.regions``. Writes data/embeddings/
{cifar_train,cifar_test,coco_train,coco_val}.safetensors (float16, keyed by image id, tagged with the
encoder's identity). Under torchrun each rank embeds a shard and rank 0 writes.
"""
from pathlib import Path

from vlmpipe.captioner.params import CaptionerParams
from vlmpipe.core.errors import stage_entry
from vlmpipe.core.stage import stage
from vlmpipe.embeddings.params import EmbeddingsParams
from vlmpipe.embeddings.stage import embed_all

SIGLIP, CIFAR, COCO, OUT = Path("models/siglip"), Path("data/cifar"), Path("data/coco"), Path("data/embeddings")


@stage_entry
def main() -> None:
    with stage("precompute_embeddings", {"embeddings": EmbeddingsParams, "captioner": CaptionerParams},
               device="embeddings.device", top=()) as s:
        embed_all(s.p, s.rank, s.device, siglip_dir=SIGLIP, cifar_root=CIFAR, coco_root=COCO, out=OUT)


if __name__ == "__main__":
    raise SystemExit(main())
