"""The ``captioner`` section: train_gpt2_captioner, and the image encoder precompute_embeddings runs for it."""
from __future__ import annotations

from dataclasses import dataclass, field

from vlmpipe.core.params import TinyLMParams, TrainParams, check, check_input_path, check_revision, looks_local


@dataclass
class CaptionerParams:
    # "siglip": the trained SigLIP image tower (offline default); else a CLIP
    # hub id or path such as "openai/clip-vit-base-patch16".
    vision_encoder: str = "siglip"
    # Hub revision of a CLIP vision_encoder (a commit hash pins it).
    vision_encoder_revision: str = "main"
    # Features per image: 1 (pooled whole image) or 5 (whole image + 4 quadrants).
    regions: int = 5
    # "tiny": build a small GPT-2 offline; else a hub id or path such as "gpt2".
    lm: str = "tiny"
    # Hub revision of a hub lm (a commit hash pins it).
    lm_revision: str = "main"
    # No LM warm-up: the captioner fine-tunes its whole LM on the captions anyway.
    tiny: TinyLMParams = field(default_factory=lambda: TinyLMParams(warmup_steps=0))
    prefix_tokens: int = 10
    # Hidden width of the prefix projector's MLP; 0: min((K/R)*H/2, 2*D) per region (ClipCap's K*H/2 for one region and small inputs).
    projector_hidden: int = 0
    freeze_lm: bool = False
    max_caption_tokens: int = 40
    beam_size: int = 3
    train: TrainParams = field(default_factory=lambda: TrainParams(epochs=24, batch_size=64, lr=2e-3, warmup_ratio=0.05,
                                                                   checkpoint_every=100))

    def validate(self, key: str) -> None:
        check(self.regions in (1, 5), f"{key}.regions", "must be 1 or 5")
        check(self.prefix_tokens >= 1, f"{key}.prefix_tokens", "must be >= 1")
        check(self.prefix_tokens % self.regions == 0, f"{key}.prefix_tokens",
              f"must be a multiple of regions ({self.regions}): each region gets the same number of tokens")
        check(self.projector_hidden >= 0, f"{key}.projector_hidden", "must be >= 0 (0: sized from the LM)")
        check_revision(self.vision_encoder_revision, f"{key}.vision_encoder_revision")
        check_revision(self.lm_revision, f"{key}.lm_revision")
        for name in ("lm", "vision_encoder"):
            if looks_local(getattr(self, name)):
                check_input_path(getattr(self, name), f"{key}.{name}", "models")
        check(self.max_caption_tokens >= 4, f"{key}.max_caption_tokens", "must be >= 4")
        check(self.beam_size >= 1, f"{key}.beam_size", "must be >= 1 (1 is greedy)")
