"""The ``evaluate`` section."""
from __future__ import annotations

from dataclasses import dataclass

from vlmpipe.core.params import check


@dataclass
class EvaluateParams:
    # Cap on held-out images scored per model (0: all).
    max_images: int = 0
    gallery_images: int = 8
    device: str = "auto"

    def validate(self, key: str) -> None:
        check(self.max_images >= 0, f"{key}.max_images", "must be >= 0")
        check(self.gallery_images >= 0, f"{key}.gallery_images", "must be >= 0")
        check(self.device in ("auto", "cpu", "cuda"), f"{key}.device", "must be 'auto', 'cpu' or 'cuda'")
