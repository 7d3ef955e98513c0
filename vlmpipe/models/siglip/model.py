"""SigLIP: image tower + text tower + sigmoid loss; training data, held-out metrics, save/load.

    model = build_siglip(params.siglip, train_texts)       # trains the BPE for the "small" text tower
    out = model(batch)                                     # dict(loss, samples, tokens) for vlmpipe.loop.train
    model.save(dir); model = load_siglip(dir)              # safetensors + config.json + tokenizer/
    model.encode_images(uint8 NHWC) / model.encode_texts(list[str])  # L2-normalised, float32, CPU

Images arrive as uint8 HxWx3 (numpy, tensor or PIL) and are preprocessed on the
model's device by ``preprocess``, the one image path for training and inference: resized to
``image_size`` (bicubic, antialiased) and
normalised with the ImageNet mean/std (what torchvision's ImageNet weights
expect; harmless for a randomly initialised tower).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from vlmpipe.core.errors import UserError
from vlmpipe.models.siglip.image_tower import ImageTower
from vlmpipe.models.siglip.loss import SigmoidLoss
from vlmpipe.models.siglip.text_tower import TextTower

FORMAT = "vlmpipe-siglip"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONFIG_KEYS = ("backbone", "image_size", "embed_dim", "text_encoder", "text_width", "text_layers", "text_max_tokens")


class SigLIP(nn.Module):
    def __init__(self, config: dict, tokenizer, pretrained: bool = False) -> None:
        super().__init__()
        self.config = dict(config)
        self.tokenizer = tokenizer
        if tokenizer.pad_token is None:  # e.g. a GPT-2-style hub tokenizer
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        c = self.config
        self.image_tower = ImageTower(c["backbone"], c["embed_dim"], pretrained=pretrained)
        self.text_tower = TextTower(c["text_encoder"], c["embed_dim"], vocab_size=len(tokenizer),
                                    width=c["text_width"], layers=c["text_layers"], max_tokens=c["text_max_tokens"],
                                    revision=c.get("text_encoder_revision") or "main")
        self.loss_fn = SigmoidLoss(init_temperature=10.0, init_bias=-10.0)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    # ---- inputs

    def preprocess(self, images) -> torch.Tensor:
        """Images -> normalised float [N, 3, S, S] on the model's device. ``images``: uint8 [N, H, W, 3]
        (numpy or tensor), or a list of uint8 H x W x 3 arrays or PIL images of any sizes. This is the one
        image path of the model: training batches, the feature cache, evaluation and every inference face
        come through it, so a picture is resized the same way wherever it is seen."""
        s = self.image_size
        if isinstance(images, (list, tuple)):
            arrays = [np.asarray(im, dtype=np.uint8) for im in images]
            if len({a.shape for a in arrays}) > 1:  # sizes differ: each image on its own
                return torch.cat([self._pixels(torch.from_numpy(a[None].copy())) for a in arrays])
            images = np.stack(arrays) if arrays else np.zeros((0, s, s, 3), np.uint8)
        return self._pixels(images if torch.is_tensor(images) else torch.from_numpy(np.array(images, dtype=np.uint8)))

    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> resized, normalised float [N, 3, S, S] on the model's device."""
        if x.dim() != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 images [N, H, W, 3], got shape {tuple(x.shape)}")
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        s = self.image_size
        if x.shape[-2:] != (s, s):
            # Bicubic with antialiasing, clamped to the pixel range: what PIL's bicubic resize does (to
            # within its rounding to 8 bits), and what CLIP-style towers are usually fed.
            x = F.interpolate(x, size=(s, s), mode="bicubic", antialias=True, align_corners=False).clamp_(0.0, 1.0)
        return (x - self.mean) / self.std

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True,
                             max_length=int(self.config["text_max_tokens"]), return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    # ---- training

    def forward(self, batch: dict) -> dict:
        """batch: images uint8 [n, H, W, 3], input_ids / attention_mask [n, T], text_ids [n] (equal = same text)."""
        img = self.image_tower(self.preprocess(batch["images"]))
        txt = self.text_tower(batch["input_ids"], batch["attention_mask"])
        return {"loss": self.loss_fn(img, txt, batch["text_ids"]), "samples": img.shape[0], "tokens": 0}

    def train_flops(self, batch: dict) -> int:
        """Model FLOPs of ``forward`` + backward on ``batch`` (``vlmpipe/core/flops.py``): the trained image
        tower 3x its forward per image; the text tower 6N per token trained, 2N frozen."""
        image, text = self._costs
        n, t = batch["input_ids"].shape
        trains_encoder = any(q.requires_grad for q in self.text_tower.encoder.parameters())
        return 3 * image * n + text.train_flops(n, t, input_grad=trains_encoder)

    @functools.cached_property
    def _costs(self):
        """(the image tower's forward FLOPs per image, the text tower's cost model), read once."""
        from vlmpipe.core.flops import TransformerCost, conv_net_forward_flops

        s = self.image_size
        image = conv_net_forward_flops(self.image_tower, torch.zeros(1, 3, s, s, device=self.device))
        enc = getattr(self.text_tower, "encoder", None)
        cfg = getattr(getattr(enc, "model", None), "config", None)  # a hub encoder
        layers = int(cfg.num_hidden_layers) if cfg is not None else int(self.config["text_layers"])
        width = int(cfg.hidden_size) if cfg is not None else int(self.config["text_width"])
        return image, TransformerCost.of(self.text_tower, layers, width)

    # ---- inference

    @torch.no_grad()
    def encode_images(self, images, batch_size: int = 256) -> torch.Tensor:
        """L2-normalised image embeddings [N, D] (float32, CPU) of ``images`` as ``preprocess`` takes them.
        Call in eval mode (BatchNorm)."""
        out = [self.image_tower(self.preprocess(images[i:i + batch_size])).float().cpu()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.config["embed_dim"])

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings [N, D] (float32, CPU). Call in eval mode (BatchNorm)."""
        out = []
        for i in range(0, len(texts), batch_size):
            enc = {k: v.to(self.device) for k, v in self.tokenize(texts[i:i + batch_size]).items()}
            out.append(self.text_tower(enc["input_ids"], enc["attention_mask"]).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.config["embed_dim"])

    # ---- persistence

    def _saved_state(self) -> dict[str, torch.Tensor]:
        # A frozen hub text encoder is referenced by its id, not copied.
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                if not k.startswith("text_tower.encoder.model.")}

    def save(self, path: str | Path) -> None:
        """Write ``path/`` (model.safetensors, config.json, tokenizer/). Wrap in ``vlmpipe.core.io.atomic_path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(self._saved_state(), str(path / "model.safetensors"), metadata={"format": FORMAT})
        (path / "config.json").write_text(json.dumps({"format": FORMAT, "version": 1, **self.config}, indent=2) + "\n")
        from vlmpipe.core.text import save_tokenizer

        save_tokenizer(self.tokenizer, path / "tokenizer")


def build_siglip(p, train_texts: Sequence[str]) -> SigLIP:
    """A fresh model from ``SiglipParams``; the small text tower gets a BPE trained on ``train_texts``."""
    config = {k: getattr(p, k) for k in CONFIG_KEYS}
    config["class_prompts"] = []  # set by the stage: the zero-shot prompts, one per class
    if p.text_encoder == "small":
        from vlmpipe.core.text import train_bpe_tokenizer

        tokenizer = train_bpe_tokenizer(train_texts, p.text_vocab_size)
    else:
        from transformers import AutoTokenizer

        from vlmpipe.core import hub

        hub.warn_unpinned(p.text_encoder, p.text_encoder_revision, "siglip.text_encoder_revision")
        tokenizer = hub.load(AutoTokenizer, p.text_encoder, p.text_encoder_revision, "siglip.text_encoder")
        config["text_encoder_revision"] = p.text_encoder_revision
    if p.pretrained:
        from vlmpipe.models.siglip.image_tower import IMAGENET_WEIGHTS

        config["image_init"] = str(IMAGENET_WEIGHTS[p.backbone])  # e.g. ResNet50_Weights.IMAGENET1K_V2
    model = SigLIP(config, tokenizer, pretrained=p.pretrained)
    if p.text_encoder != "small":
        from vlmpipe.core import hub

        # The commit the frozen encoder came from: load_siglip loads that very one again.
        model.config["text_encoder_revision"] = (hub.resolved_commit(p.text_encoder, p.text_encoder_revision)
                                                 or p.text_encoder_revision)
    return model


def load_siglip(path: str | Path, device: str | torch.device = "cpu") -> SigLIP:
    """Load a model written by ``SigLIP.save`` (eval mode, on ``device``)."""
    from transformers import AutoTokenizer

    from vlmpipe.core import hub
    from vlmpipe.core.io import read_json_file, read_safetensors

    path = Path(path)
    rebuild = "run `dvc repro train_siglip` (or `dvc checkout models/siglip`)"
    for need in ("config.json", "model.safetensors", "tokenizer"):
        if not (path / need).exists():
            raise UserError(f"{path}: not a saved SigLIP model (no {need}); {rebuild}")
    config = read_json_file(path / "config.json", rebuild)
    if config.get("format") != FORMAT:
        raise UserError(f"{path / 'config.json'}: not a SigLIP config (format {config.get('format')!r})")
    missing_keys = [k for k in CONFIG_KEYS if k not in config]
    if missing_keys:
        raise UserError(f"{path / 'config.json'}: incomplete config (no {missing_keys[0]}); {rebuild}")
    tokenizer = hub.load(AutoTokenizer, path / "tokenizer", "main", f"{path / 'tokenizer'}")
    try:
        model = SigLIP({k: v for k, v in config.items() if k not in ("format", "version")}, tokenizer)
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"{path / 'config.json'}: not a usable SigLIP config ({e}); {rebuild}") from None
    state = read_safetensors(path / "model.safetensors", rebuild)
    expected = model._saved_state()
    wrong = [k for k, v in expected.items() if k not in state or state[k].shape != v.shape]
    if wrong:
        raise UserError(f"{path / 'model.safetensors'}: does not fit config.json (missing or other shape: "
                        f"{wrong[:3]}); {rebuild}")
    model.load_state_dict(state, strict=False)
    return model.to(device).eval()
