"""SigLIP on held-out images: zero-shot classification and image<->text recall@1/5, beside their chance
levels."""
from __future__ import annotations

import math

import numpy as np
import torch


def _recall_chance(q: np.ndarray, n: int, k: int) -> float:
    """Mean over queries of P(a random ranking of n items puts one of the query's q matches in the top k)."""
    return float(np.mean([1.0 - math.comb(n - int(qi), k) / math.comb(n, k) for qi in q]))


def retrieval_metrics(model, images: np.ndarray, labels: np.ndarray, prompts: list[str],
                      captions: list[str]) -> dict[str, float]:
    """Zero-shot classification over ``prompts`` (one per class) and image<->text recall@1/5.

    Retrieval runs over N held-out (image, caption) pairs; ``captions[i]`` is
    None for images left out of it (pass only complete captions: a caption
    that omits the colour is also true of a red circle, and would count as a
    wrong answer). Captions repeat (many images are "a photo of a red circle
    on a dark background") and identical texts cannot be told apart, so a
    retrieved item counts as correct when its caption is the query's. The
    chance level is then the same for both directions: the mean over pairs of
    1 - C(N - q, k) / C(N, k), q the number of pairs sharing the query's caption.
    """
    img = model.encode_images(images)
    zs = (img @ model.encode_texts(prompts).t()).argmax(1).numpy()
    out = {"zero_shot_acc": float((zs == labels).mean()), "zero_shot_chance": 1.0 / len(prompts)}
    keep = [i for i, c in enumerate(captions) if c]
    if len(keep) < 2:
        return out
    img, captions = img[keep], [captions[i] for i in keep]
    uniq = sorted(set(captions))
    cap_id = torch.tensor([uniq.index(c) for c in captions])
    txt = model.encode_texts(uniq)[cap_id]  # [N, D], one row per pair
    sims = img @ txt.t()                    # [N images, N texts]
    same = cap_id[:, None] == cap_id[None, :]
    n = len(captions)
    q = same.sum(1).numpy()
    for k in (1, 5):
        k_ = min(k, n)
        i2t = sims.topk(k_, dim=1).indices            # texts for each image
        t2i = sims.t().topk(k_, dim=1).indices        # images for each text
        out[f"i2t_r{k}"] = float(same.gather(1, i2t).any(1).float().mean())
        out[f"t2i_r{k}"] = float(same.gather(1, t2i).any(1).float().mean())
        out[f"r{k}_chance"] = _recall_chance(q, n, k_)
    return out
