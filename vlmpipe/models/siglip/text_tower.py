"""The SigLIP text tower: a text encoder -> masked mean pool -> BatchNorm1d -> Linear -> L2-normalised embedding.

Two encoders:

- ``"small"``: a small pre-norm transformer (``text_width``, ``text_layers``,
  learned positions) trained jointly with the image tower, on token ids from a
  byte-level BPE trained on the project's texts (``vlmpipe.core.text``).
- anything else: a Hugging Face model id or path loaded with ``AutoModel``,
  frozen (no gradients, always in eval mode); only the projection trains.

Pooling is the mean over *real* tokens: padded positions are masked out of the
attention and zeroed before the sum, so a padding position is never read (the
origin project read a frozen encoder's output at a padding position).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn



def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` [B, T, C] over positions where ``mask`` [B, T] is 1."""
    m = mask.unsqueeze(-1).bool()
    summed = hidden.masked_fill(~m, 0.0).sum(dim=1)
    return summed / m.sum(dim=1).clamp_min(1).to(hidden.dtype)


class SmallTextEncoder(nn.Module):
    def __init__(self, vocab_size: int, width: int, layers: int, max_tokens: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(max_tokens, width) * 0.01)
        layer = nn.TransformerEncoderLayer(width, nhead=max(1, width // 32), dim_feedforward=4 * width,
                                           dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        # enable_nested_tensor=False: one code path in train and eval mode.
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(width)
        self.out_features = width

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        x = self.tok(input_ids) + self.pos[:T]
        x = self.blocks(x, src_key_padding_mask=attention_mask == 0)
        return masked_mean(self.ln(x), attention_mask)


class HFTextEncoder(nn.Module):
    """A frozen Hugging Face encoder; gradients never flow into it."""

    def __init__(self, name: str, revision: str = "main") -> None:
        super().__init__()
        from transformers import AutoModel

        from vlmpipe.core import hub

        self.model = hub.load(AutoModel, name, revision, "siglip.text_encoder")
        self.model.requires_grad_(False)
        self.model.eval()
        self.out_features = int(self.model.config.hidden_size)

    def train(self, mode: bool = True) -> "HFTextEncoder":
        super().train(mode)
        self.model.eval()  # frozen: no dropout, whatever the tower's mode
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return masked_mean(h.float(), attention_mask)


class TextTower(nn.Module):
    """Token ids + attention mask -> L2-normalised embeddings [B, embed_dim]."""

    def __init__(self, encoder: str, embed_dim: int, *, vocab_size: int = 0, width: int = 128,
                 layers: int = 2, max_tokens: int = 32, revision: str = "main") -> None:
        super().__init__()
        if encoder == "small":
            self.encoder: nn.Module = SmallTextEncoder(vocab_size, width, layers, max_tokens)
        else:
            self.encoder = HFTextEncoder(encoder, revision)
        feat = self.encoder.out_features
        self.norm = nn.BatchNorm1d(feat)  # see image_tower.py: the sigmoid loss stalls without it
        self.proj = nn.Linear(feat, embed_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.norm(self.encoder(input_ids, attention_mask))), dim=-1)
