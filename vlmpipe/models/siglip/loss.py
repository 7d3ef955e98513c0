"""The SigLIP pairwise sigmoid loss (Zhai et al., "Sigmoid Loss for Language Image Pre-Training", 2023).

Every (image, text) pair in the batch is an independent binary problem:

    loss = -1/|images| * sum_i sum_j log sigmoid( z_ij * (t * <x_i, y_j> + b) )

with z_ij = +1 for a matching pair and -1 otherwise, t = exp(t') a learnable
temperature (t' initialised to log 10) and b a learnable bias (initialised to
-10, so the many negatives do not dominate the first steps). Unlike the
softmax CLIP loss there is no normalisation across the batch, and the
temperature is applied exactly once.

Two things the origin project got wrong are handled here:

- z_ij comes from text *identity*, not from the diagonal: two images whose
  texts are the same string ("a photo of a cat") are both positives for that
  text. Each sample carries an integer text id; equal ids mean equal texts.
- Under DDP the negatives come from every rank: text embeddings (and their
  ids) are all-gathered with a gradient-carrying collective, so the loss over
  a global batch B split across W ranks equals the single-process loss over B
  (each rank normalises by its own images; DDP's gradient averaging makes the
  mean over ranks the mean over all images).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate ``x`` from every rank (equal shapes); backward sums each rank's gradient for our rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss depends on our rows: their gradient is the sum over ranks.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        n = grad.shape[0] // ctx.world
        return grad[ctx.rank * n:(ctx.rank + 1) * n]


def gather_across_ranks(x: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
    """All ranks' ``x`` concatenated along dim 0 (just ``x`` when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    if with_grad:
        return _AllGatherWithGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class SigmoidLoss(nn.Module):
    """Holds the learnable temperature and bias; ``forward`` returns the scalar loss."""

    def __init__(self, init_temperature: float = 10.0, init_bias: float = -10.0) -> None:
        super().__init__()
        self.log_temperature = nn.Parameter(torch.tensor(math.log(init_temperature)))
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))

    def logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        return image_emb @ text_emb.t() * self.log_temperature.exp() + self.bias

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        """``image_emb`` [n, D] and ``text_emb`` [n, D] are this rank's pairs (L2-normalised);
        ``text_ids`` [n] int: equal ids mean identical texts (positives for each other's images)."""
        # fp32 even under bf16 autocast: exp(t') * cos reaches ~100 and the sum runs over n * B terms.
        with torch.autocast(image_emb.device.type, enabled=False):
            all_text = gather_across_ranks(_at_least_fp32(text_emb))
            all_ids = gather_across_ranks(text_ids, with_grad=False)
            logits = self.logits(_at_least_fp32(image_emb), all_text)
            z = (text_ids[:, None] == all_ids[None, :]).to(logits.dtype) * 2 - 1
            return -F.logsigmoid(z * logits).sum() / image_emb.shape[0]


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
