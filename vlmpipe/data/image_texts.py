"""Texts of the CIFAR images from the Q/A CSV, and the image-text pairs SigLIP trains on.

Each image gets a class prompt ("a photo of a circle"), a caption composed from its row's answers
("a photo of a red circle on a dark background") and its "question answer" pairs; held-out
retrieval runs over the composed captions (``retrieval_captions``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from vlmpipe.data.qa import A_COLS, Q_COLS, T_COLS, class_prompts


@dataclass
class SplitTexts:
    """Texts of one split's images from the Q/A CSV.

    captions[i]: composed from the row's answers by question type, "a photo of a red circle on a
    dark background" (parts the row does not ask about are left out; None without a row);
    complete[i]: the caption names class, colour and background; qa_texts[i]: each "question
    answer" pair of the row; prompts[c]: the class prompt "a photo of a circle"."""

    captions: list
    complete: list[bool]
    qa_texts: list[list[str]]
    prompts: list[str]


def image_texts(df, split: str, n_images: int, label_names: list[str]) -> SplitTexts:
    out = SplitTexts([None] * n_images, [False] * n_images, [[] for _ in range(n_images)], class_prompts(label_names))
    for r in df[df["Split"] == split].itertuples(index=False):
        d = r._asdict()
        i, label = int(d["Dataset_Index"]), str(d["Class_Label"])
        by_type = {d[t]: d[a] for q, a, t in zip(Q_COLS, A_COLS, T_COLS) if d[q]}
        colour, bg = by_type.get("colour"), by_type.get("brightness")
        cap = " ".join(w for w in (colour, label) if w)
        if bg in ("light", "dark"):
            cap += f" on a {bg} background"
        out.captions[i] = f"a photo of {'an' if cap[0] in 'aeiou' else 'a'} {cap}"
        out.complete[i] = bool(colour) and bg in ("light", "dark")
        out.qa_texts[i] += [f"{d[q]} {d[a]}" for q, a in zip(Q_COLS, A_COLS) if d[q]]
    return out


def retrieval_captions(texts: SplitTexts, labels: Sequence[int], limit: int = 0) -> list:
    """The held-out captions retrieval runs over, one per image (None: left out).

    The composed captions that name class, colour and background; a caption missing one of them
    is also true of other images and would count as a wrong answer. A user's CSV without colour
    and brightness questions leaves fewer than two such captions: then every image takes its
    class prompt, so retrieval (and its keys in the metrics) is still there, only easier.
    ``limit`` > 0: the first ``limit`` images only (the decision is made on those).
    """
    n = limit or len(labels)
    captions = [c if ok else None for c, ok in zip(texts.captions[:n], texts.complete[:n])]
    if sum(map(bool, captions)) < 2:
        captions = [c or texts.prompts[int(lab)] for c, lab in zip(texts.captions[:n], labels[:n])]
    return captions


class ImageTextPairs(torch.utils.data.Dataset):
    """CIFAR images, each with several texts; one text per image and epoch is chosen
    deterministically from (seed, epoch), so runs, resumes and DDP shardings agree.

    Why this mix: the class prompt aligns images with what zero-shot classification
    asks; the composed caption adds colour and background, so the image embedding
    also carries what the VQA stage asks about (a class-only signal would teach
    the tower to ignore colour); the "question answer" texts tie in the CSV's own
    wording and facts. Identical strings get one text id: they are positives for
    each other's images in the sigmoid loss, never negatives.
    """

    # Measured on the offline default (12 epochs): at 0.4 / 0.3 the towers ignored colour (a linear
    # probe found it in 32 % of test embeddings, retrieval R@1 0.15-0.19) and every colour question
    # downstream was a guess; at 0.3 / 0.45 the probe finds colour in 94 %, R@1 is 0.88 and
    # zero-shot accuracy stays at 0.95 (0.98 before).
    PROMPT_P = 0.3    # class prompt (what zero-shot classification asks)
    CAPTION_P = 0.45  # composed caption (class + colour + background); the rest: one Q/A pair

    def __init__(self, images: np.ndarray, labels: np.ndarray, prompts: list[str], captions: list, qa_texts: list[list[str]],
                 tokenizer, max_tokens: int, seed: int) -> None:
        self.images, self.labels, self.seed = images, labels, seed
        self.choices = [[prompts[int(lab)], cap or prompts[int(lab)], *qa] for lab, cap, qa in zip(labels, captions, qa_texts)]
        self.vocab = sorted({t for c in self.choices for t in c})
        index = {t: k for k, t in enumerate(self.vocab)}
        self.choice_ids = [[index[t] for t in c] for c in self.choices]
        self.token_ids = tokenizer(self.vocab, truncation=True, max_length=max_tokens)["input_ids"]
        self.pad_id = tokenizer.pad_token_id
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        rng = np.random.default_rng([self.seed, epoch, 7])
        u, v = rng.random(len(self.images)), rng.random(len(self.images))
        self.pick = []
        for i, ids in enumerate(self.choice_ids):  # ids: [prompt, caption, *qa pairs]
            if u[i] < self.PROMPT_P:
                k = 0
            elif u[i] < self.PROMPT_P + self.CAPTION_P or len(ids) == 2:
                k = 1
            else:
                k = 2 + int(v[i] * (len(ids) - 2))
            self.pick.append(ids[k])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.pick[i]

    def collate(self, items: list) -> dict:
        imgs, tids = zip(*items)
        toks = [self.token_ids[t] for t in tids]
        T = max(len(t) for t in toks)
        ids = torch.full((len(toks), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(toks), T), dtype=torch.long)
        for j, t in enumerate(toks):
            ids[j, :len(t)], mask[j, :len(t)] = torch.tensor(t), 1
        return {"images": torch.from_numpy(np.stack(imgs)), "input_ids": ids, "attention_mask": mask,
                "text_ids": torch.tensor(tids, dtype=torch.long)}
