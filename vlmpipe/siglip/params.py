"""The ``siglip`` section: train_siglip."""
from __future__ import annotations

from dataclasses import dataclass, field

from vlmpipe.core.params import TrainParams, check, check_input_path, check_revision, looks_local


@dataclass
class SiglipParams:
    # "resnet_small" (widths 16/32/64/128, trains in seconds per epoch on CPU),
    # "resnet18" or "resnet50" (torchvision).
    backbone: str = "resnet_small"
    # Load ImageNet weights for torchvision backbones (needs the weights cached).
    pretrained: bool = False
    # Images are resized to this side before the tower (224 for ImageNet ResNets).
    image_size: int = 32
    embed_dim: int = 512
    # "small": a transformer text encoder trained jointly. Anything else is a
    # Hugging Face model id or path: frozen, masked mean-pooled, projected.
    text_encoder: str = "small"
    # The hub revision of a hub text_encoder (a commit hash pins it; a branch follows it).
    text_encoder_revision: str = "main"
    text_width: int = 128
    text_layers: int = 2
    text_max_tokens: int = 32
    # Byte-level BPE vocabulary of the "small" text tower (>= 512: room beyond the 256 byte symbols).
    text_vocab_size: int = 1024
    # The temperature and bias learn this many times faster than the towers: the bias starts at
    # -10 and must climb several units; at 10x it barely moved in a 12-epoch offline run (zero-shot
    # stayed at chance for 6 epochs), at 100x zero-shot reached 0.8 in 6.
    logit_lr_mult: float = 100.0
    train: TrainParams = field(default_factory=lambda: TrainParams(epochs=32, batch_size=128, lr=2e-3, warmup_ratio=0.05,
                                                                   checkpoint_every=100))

    def validate(self, key: str) -> None:
        check(self.backbone in ("resnet_small", "resnet18", "resnet50"), f"{key}.backbone", f"unknown backbone {self.backbone!r}")
        check(16 <= self.image_size <= 512, f"{key}.image_size", "must be between 16 and 512")
        check(self.embed_dim >= 8, f"{key}.embed_dim", "must be >= 8")
        check(self.text_width >= 8, f"{key}.text_width", "must be >= 8")
        check(self.text_layers >= 1, f"{key}.text_layers", "must be >= 1")
        check(self.text_max_tokens >= 4, f"{key}.text_max_tokens", "must be >= 4")
        check(self.text_vocab_size >= 512, f"{key}.text_vocab_size", "must be >= 512 (a byte-level BPE needs room beyond its 256 byte symbols)")
        check(self.logit_lr_mult > 0, f"{key}.logit_lr_mult", "must be > 0")
        check_revision(self.text_encoder_revision, f"{key}.text_encoder_revision")
        if looks_local(self.text_encoder):
            check_input_path(self.text_encoder, f"{key}.text_encoder", "models")
