"""The ``embeddings`` section: precompute_embeddings."""
from __future__ import annotations

from dataclasses import dataclass

from vlmpipe.core.params import check


@dataclass
class EmbeddingsParams:
    batch_size: int = 256
    device: str = "auto"
    # Processes reading and decoding the images (COCO JPEGs from the zips); 0: the stage's own.
    num_workers: int = 0

    def validate(self, key: str) -> None:
        check(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1")
        check(0 <= self.num_workers <= 64, f"{key}.num_workers", "must be between 0 and 64")
        check(self.device in ("auto", "cpu", "cuda"), f"{key}.device", "must be 'auto', 'cpu' or 'cuda'")
