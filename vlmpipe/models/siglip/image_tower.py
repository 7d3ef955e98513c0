"""The SigLIP image tower: a torchvision ResNet trunk -> BatchNorm1d -> Linear -> L2-normalised embedding.

Backbones:

- ``resnet50`` / ``resnet18``: torchvision's, with ImageNet weights when
  ``pretrained`` — pinned (``IMAGENET_WEIGHTS``, not torchvision's moving
  ``DEFAULT``), fetched once into the torch hub cache (``$TORCH_HOME``) by the
  project's download helper (resumable, checked against the hash prefix in the
  file name, as torch.hub does), then loaded from there by torchvision.
- ``resnet_small``: a reduced-width ResNet (torchvision ``BasicBlock``s, widths
  16/32/64/128, two blocks per stage, ~0.8M parameters) for 32x32 images on a
  CPU. Its stem is one stride-2 3x3 convolution (no max-pool): 32 px -> 16 px
  feature maps. Measured on this 2-core CPU, a stride-1 stem (the CIFAR-ResNet
  choice) is ~3x slower per image and a stock 7x7/2 stem + pool (32 -> 8 px)
  leaves little spatial detail for small shapes.

The BatchNorm1d before the final linear is not decoration: measured on the
offline default, the sigmoid loss stalled (all embeddings nearly identical)
without it. It re-centres and re-scales the pooled features per batch, so the
projection starts from spread-out embeddings.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv_resnet

from vlmpipe.core.errors import UserError

BACKBONES = ("resnet_small", "resnet18", "resnet50")


class SmallResNet(nn.Module):
    """CIFAR-style ResNet with widths 16/32/64/128 built from torchvision BasicBlocks."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), blocks_per_stage: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            for b in range(blocks_per_stage):
                down = None
                if b == 0 and (stride != 1 or cin != w):
                    down = nn.Sequential(nn.Conv2d(cin, w, 1, stride=stride, bias=False), nn.BatchNorm2d(w))
                layers.append(tv_resnet.BasicBlock(cin, w, stride=stride if b == 0 else 1, downsample=down))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.out_features = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


# The ImageNet weights each backbone starts from: a fixed entry, so a torchvision upgrade that
# moves DEFAULT cannot change what a preset trains from.
IMAGENET_WEIGHTS = {"resnet18": tv_resnet.ResNet18_Weights.IMAGENET1K_V1,
                    "resnet50": tv_resnet.ResNet50_Weights.IMAGENET1K_V2}


def weights_file(backbone: str) -> Path:
    """Where torchvision looks for (and caches) the backbone's ImageNet weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(IMAGENET_WEIGHTS[backbone].url).name


def fetch_weights(backbone: str) -> Path:
    """The ImageNet weights file of ``backbone`` in the torch hub cache, downloaded when absent."""
    from vlmpipe.core.download import download, file_digest

    w = IMAGENET_WEIGHTS[backbone]
    dest = weights_file(backbone)
    if dest.is_file():
        return dest
    download(w.url, dest, key="siglip.pretrained",
             hint=f"put {dest.name} in {dest.parent} (or set TORCH_HOME), or set siglip.pretrained: false")
    # torch.hub's convention: the name ends in -<first hex digits of the file's sha256>.
    prefix = re.search(r"-([0-9a-f]{6,})\.", dest.name)
    if prefix and not file_digest(dest, "sha256").startswith(prefix.group(1)):
        dest.unlink()
        raise UserError(f"siglip.pretrained: {w.url} does not match the sha256 prefix {prefix.group(1)} "
                        "in its name (deleted the download)")
    return dest


def _torchvision_trunk(backbone: str, pretrained: bool) -> tuple[nn.Module, int]:
    builder = {"resnet18": tv_resnet.resnet18, "resnet50": tv_resnet.resnet50}[backbone]
    weights = None
    if pretrained:
        fetch_weights(backbone)  # torchvision then reads the cached file, without the network
        weights = IMAGENET_WEIGHTS[backbone]
    try:
        trunk = builder(weights=weights)
    except (RuntimeError, OSError, EOFError, ValueError) as e:  # a damaged cached file
        raise UserError(f"{weights_file(backbone)}: unreadable ImageNet weights ({str(e).splitlines()[0][:200]}); "
                        "delete it to download it again") from None
    feat = trunk.fc.in_features
    trunk.fc = nn.Identity()
    return trunk, feat


class ImageTower(nn.Module):
    """Normalised float images [B, 3, H, W] -> L2-normalised embeddings [B, embed_dim]."""

    def __init__(self, backbone: str, embed_dim: int, pretrained: bool = False) -> None:
        super().__init__()
        if backbone == "resnet_small":
            if pretrained:
                raise UserError("siglip.pretrained: no pretrained weights exist for resnet_small (set it to false)")
            self.trunk: nn.Module = SmallResNet()
            feat = self.trunk.out_features
        elif backbone in BACKBONES:
            self.trunk, feat = _torchvision_trunk(backbone, pretrained)
        else:
            raise UserError(f"siglip.backbone: unknown backbone {backbone!r} (known: {', '.join(BACKBONES)})")
        self.norm = nn.BatchNorm1d(feat)
        self.proj = nn.Linear(feat, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.norm(self.trunk(x))), dim=-1)
