"""Tiny untrained models laid out as the stages write them: ``models/{siglip,captioner,chat,phi2_vlm}``
(the prefix models record their SigLIP as ``../siglip``), built from config in seconds. For tests whose
point is that a face (the registry, the CLI, the server, predict, export) answers exactly as the
project's own back end does, not that the answers are right."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vlmpipe.data import features as embeddings

TEXTS = ["a red circle", "a blue square on a grey background", "what colour is the circle?", "red", "yes"]


def build(root: Path) -> tuple[Path, list[Path]]:
    """``root/models/…`` and two random PNG images ``root/image{0,1}.png``; returns (root, images)."""
    from PIL import Image

    from vlmpipe.models import captioner as C
    from vlmpipe.models import qa_model as Q
    from vlmpipe.models.chat_model import ChatModel
    from vlmpipe.models.siglip.model import build_siglip
    from vlmpipe.qa.params import Phi2Params
    from vlmpipe.siglip.params import SiglipParams
    from vlmpipe.core.params import TinyLMParams
    from vlmpipe.loop import tiny_base

    models = root / "models"
    torch.manual_seed(0)
    build_siglip(SiglipParams(embed_dim=32, text_width=32, text_layers=1, text_vocab_size=512),
                 TEXTS).eval().save(models / "siglip")
    encoder = {**embeddings.siglip_identity(models / "siglip"), "path": "../siglip"}
    tiny = TinyLMParams(vocab_size=512, hidden_size=32, layers=1, heads=2, warmup_steps=0)
    gpt2 = tiny_base.build("gpt2", tiny, TEXTS * 4, root / "base/gpt2", seed=0, device="cpu")
    cap = C.build_captioner(gpt2, encoder=encoder, feature_dim=32, regions=5, prefix_tokens=5, freeze_lm=False,
                            beam_size=2, max_caption_tokens=10, seed=0, source_name="tiny")
    cap.save(models / "captioner")
    ChatModel.from_captioner(C.load_captioner(models / "captioner"), max_seq_len=64,
                             max_new_tokens=6).save(models / "chat")
    p = Phi2Params(tiny=TinyLMParams(vocab_size=512, hidden_size=32, layers=1, heads=2, warmup_steps=0),
                   prefix_tokens=2, max_new_tokens=4, max_seq_len=48)
    phi = tiny_base.build("phi", p.tiny, TEXTS * 4, root / "base/phi", seed=0, device="cpu")
    Q.build_qa_model(p, phi, "cpu", encoder=encoder, feature_dim=32, regions=1).eval().save(models / "phi2_vlm")
    rng = np.random.default_rng(0)
    images = []
    for i in range(2):
        images.append(root / f"image{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images[-1])
    return root, images
