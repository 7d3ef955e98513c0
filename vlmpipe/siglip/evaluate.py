"""SigLIP in the evaluate_siglip stage: zero-shot accuracy and recall@1/5 on held-out CIFAR, beside chance."""
from __future__ import annotations

import torch

from vlmpipe.data.cifar import load_split
from vlmpipe.data.image_texts import image_texts, retrieval_captions
from vlmpipe.data.qa import read_qa_csv
from vlmpipe.models.siglip.model import load_siglip
from vlmpipe.scoring.metrics import first, round4
from vlmpipe.siglip.heldout import retrieval_metrics


@torch.no_grad()
def evaluate(e, *, siglip_dir, cifar_root, csv_path, device="cpu") -> tuple[dict, list]:
    """(the ``siglip`` section of reports/metrics.json, no examples) under ``EvaluateParams`` ``e``."""
    return round4(evaluate_siglip(siglip_dir, cifar_root, read_qa_csv(csv_path, cifar_root), e.max_images, device)), []


def evaluate_siglip(siglip_dir, cifar_root, df, limit: int = 0, device="cpu") -> dict:
    """Zero-shot accuracy and recall@1/5 both ways on held-out CIFAR, with chance levels."""
    model = load_siglip(siglip_dir, device)
    test = load_split(cifar_root, "test")
    n = first(len(test), limit)
    texts = image_texts(df, "test", len(test), test.label_names)
    # The same held-out captions train_siglip reports per epoch (and the same fallback for a CSV
    # without colour or brightness questions).
    captions = retrieval_captions(texts, test.labels, n)
    with torch.no_grad():
        return retrieval_metrics(model, test.images[:n], test.labels[:n], texts.prompts, captions)
