"""The CIFAR question/answer CSV of build_cifar_qa_csv (columns in ``vlmpipe.data.qa``): generated, or
the user's ``qa.csv_path`` validated and written in those columns (``write_user_csv``).

Every answer is derived from something the project knows, never guessed:

- ``class`` / ``class_yesno``: the label (yes/no questions name the true
  class or another one with equal odds, so answering blind scores 50 %);
- ``supercategory`` and ``fact_<name>``: the per-class table ``facts.json``;
- ``colour``: the colour of the object, computed from its pixels (pixels
  far from the border's median colour, named by the nearest palette colour;
  asked only when one name covers most of them);
- ``brightness``: whether the background (the image border) is light or dark;
  asked only when it is clearly one or the other.

Questions are drawn from several paraphrases per type with a generator
seeded by (seed, split, index): same seed, same bytes.

A user's CSV about one split only (the origin project's labelled CIFAR-10's
test split) gets a ``Heldout`` column: a seeded ``qa.heldout_fraction`` of its
images, every row about them, is held out for evaluation. Every later stage
then finds training and held-out rows.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from vlmpipe.core.errors import UserError
from vlmpipe.core.io import write_text
from vlmpipe.data.cifar import SPLITS, load_split
from vlmpipe.data.qa import COLUMNS, HELDOUT, N_QUESTIONS, heldout, qa_frame, read_qa_csv, with_article
from vlmpipe.sources import shapes

log = logging.getLogger(__name__)


TEMPLATES = {
    "class": ["what is this {noun}?", "which {noun} is shown in the picture?", "what {noun} do you see?", "name the {noun} in the image."],
    "class_yesno": ["is this {a_label}?", "is there {a_label} in the picture?", "does the image show {a_label}?"],
    "colour": ["what colour is the {noun}?", "what is the colour of the {noun}?", "which colour does the {noun} have?"],
    "brightness": ["is the background light or dark?", "is the background dark or light?", "how bright is the background, light or dark?"],
}


# Pixel colours are named by the nearest of these: the shapes palette plus
# neutral colours, so a grey or brown object in a real photo is not forced
# into a bright name.
NAMED_COLOURS: dict[str, tuple[int, int, int]] = {
    **shapes.COLOURS,
    "white": (235, 235, 235),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
    "brown": (125, 80, 40),
}
_OBJECT_DISTANCE = 60.0   # RGB distance from the background that marks an object pixel
_MIN_OBJECT_PIXELS = 20
_MIN_COLOUR_SHARE = 0.5
_LIGHT, _DARK = 140.0, 100.0  # border luma thresholds; in between is not asked


@functools.cache
def load_facts() -> dict[str, Any]:
    return json.loads(Path(__file__).with_name("facts.json").read_text(encoding="utf-8"))


def facts_section(label_names: list[str]) -> dict[str, Any] | None:
    """The facts table whose classes are ``label_names`` (CIFAR-10 or shapes), else None."""
    for section in load_facts().values():
        if sorted(section["classes"]) == sorted(label_names):
            return section
    return None


def _borders(images: np.ndarray) -> np.ndarray:
    """N×H×W×3 → N×P×3 float: the pixels of each image's outer ring."""
    return np.concatenate([images[:, 0], images[:, -1], images[:, 1:-1, 0], images[:, 1:-1, -1]], axis=1).astype(np.float32)


def background_brightness(images: np.ndarray) -> list[str | None]:
    """Per image: "light" or "dark" from the median luma of its border; None if in between."""
    luma = _borders(images) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    med = np.median(luma, axis=1)
    return ["light" if m >= _LIGHT else "dark" if m <= _DARK else None for m in med]


def object_colours(images: np.ndarray, chunk: int = 256) -> list[str | None]:
    """Per image: the colour name of the object (not the background); None when unclear."""
    palette = np.array(list(NAMED_COLOURS.values()), dtype=np.float32)
    names = list(NAMED_COLOURS)
    out: list[str | None] = []
    for start in range(0, len(images), chunk):  # chunks bound the temporary arrays
        imgs = images[start:start + chunk]
        bg = np.median(_borders(imgs), axis=1)                       # N×3
        px = imgs.reshape(len(imgs), -1, 3).astype(np.float32)       # N×P×3
        is_obj = np.linalg.norm(px - bg[:, None, :], axis=2) > _OBJECT_DISTANCE
        # Name only the object pixels: nearest palette colour via |p|^2 - 2 p.c + |c|^2
        # (|p|^2 is the same for every candidate, so it drops out of the argmin).
        img_idx = np.nonzero(is_obj)[0]
        nearest = (px[is_obj] @ (-2 * palette.T) + (palette ** 2).sum(1)).argmin(1)
        counts = np.bincount(img_idx * len(names) + nearest, minlength=len(imgs) * len(names)).reshape(len(imgs), len(names))
        total = is_obj.sum(axis=1)
        for n, c in zip(total, counts):
            top = int(c.argmax())
            ok = n >= _MIN_OBJECT_PIXELS and c[top] >= _MIN_COLOUR_SHARE * n
            out.append(names[top] if ok else None)
    return out


def _answers(label: str, section: dict | None, colour: str | None, brightness: str | None) -> dict[str, str]:
    """Every question type this image can be asked, with its true answer."""
    out = {"class": label}
    if section:
        for fact, spec in section["facts"].items():
            out["supercategory" if fact == "supercategory" else f"fact_{fact}"] = spec["answers"][label]
    if colour:
        out["colour"] = colour
    if brightness:
        out["brightness"] = brightness
    return out


def _templates(qtype: str, section: dict | None) -> list[str]:
    if qtype in TEMPLATES:
        return TEMPLATES[qtype]
    fact = "supercategory" if qtype == "supercategory" else qtype[len("fact_"):]
    return section["facts"][fact]["questions"]


def generate_rows(data, split: str, seed: int, questions_per_image: int) -> list[list[Any]]:
    """One CSV row per image of ``data`` (a ``CifarSplit``)."""
    section = facts_section(data.label_names)
    noun = section["noun"] if section else "object"
    colours = object_colours(data.images)
    brightness = background_brightness(data.images)
    rows = []
    for idx in tqdm(range(len(data)), desc=f"qa {split}", mininterval=2.0, leave=False):
        label = data.label_names[data.labels[idx]]
        rng = np.random.default_rng([seed, SPLITS.index(split), int(idx)])
        answers = _answers(label, section, colours[idx], brightness[idx])
        types = list(answers) + ["class_yesno"]
        chosen = [types[i] for i in rng.choice(len(types), size=min(questions_per_image, len(types)), replace=False)]
        qs, ans = [], []
        for qtype in chosen:
            template = str(rng.choice(_templates(qtype, section)))
            if qtype == "class_yesno":
                # The named class is the true one half the time, so the
                # answer cannot be guessed from the question.
                others = [n for n in data.label_names if n != label]
                ask = label if rng.random() < 0.5 else str(rng.choice(others))
                qs.append(template.format(a_label=with_article(ask)))
                ans.append("yes" if ask == label else "no")
            else:
                qs.append(template.format(noun=noun))
                ans.append(answers[qtype])
        pad = N_QUESTIONS - len(chosen)
        rows.append([idx, label, split, *qs, *[""] * pad, *ans, *[""] * pad, *chosen, *[""] * pad])
    return rows


def _to_csv(rows: list[list[Any]], columns: list[str] = COLUMNS) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows(rows)
    return buf.getvalue()


def write_qa_csv(dest: str | os.PathLike, cifar_root: str | os.PathLike, seed: int, questions_per_image: int = N_QUESTIONS) -> pd.DataFrame:
    """Generate the Q/A CSV for both splits of ``cifar_root``, write it atomically, return it."""
    rows = []
    for split in SPLITS:
        rows += generate_rows(load_split(cifar_root, split), split, seed, questions_per_image)
    write_text(dest, _to_csv(rows))
    return qa_frame(rows)


def hold_out(df: pd.DataFrame, fraction: float, seed: int, src: str | os.PathLike) -> pd.DataFrame:
    """``df`` (rows of one split) with a ``Heldout`` column: a seeded ``fraction`` of its images, at least
    one and never all, held out with every row about them."""
    split = str(df["Split"].iloc[0])
    images = sorted(set(df["Dataset_Index"].tolist()))
    if len(images) < 2:
        raise UserError(f"{src}: every row is about {split} image {images[0]}; holding images out for "
                        f"evaluation needs rows about two images at least")
    n = min(len(images) - 1, max(1, round(fraction * len(images))))
    # Stream (seed, 3): apart from the generator's (seed, split, index) ones.
    held = set(np.random.default_rng([seed, 3]).choice(images, size=n, replace=False).tolist())
    log.info("%s: rows of the %s split only: %d of its %d images held out for evaluation (qa.heldout_fraction "
             "%g, seed %d)", src, split, n, len(images), fraction, seed)
    return df.assign(**{HELDOUT: ["yes" if i in held else "no" for i in df["Dataset_Index"].tolist()]})


def write_user_csv(src: str | os.PathLike, dest: str | os.PathLike, cifar_root: str | os.PathLike, split: str,
                   heldout_fraction: float, seed: int) -> pd.DataFrame:
    """Validate the user's CSV ``src`` against ``cifar_root`` (``split``: ``qa.split``), settle which
    images are held out (``hold_out`` when it has one split and no ``Heldout`` column), check that
    training and held-out rows are both there, and write it to ``dest`` in the columns of
    ``vlmpipe.data.qa``; returns it."""
    df = read_qa_csv(src, cifar_root, split)
    if HELDOUT not in df.columns and df["Split"].nunique() == 1:
        df = hold_out(df, heldout_fraction, seed, src)
    held = heldout(df)
    if held.all() or not held.any():  # only a user's own Heldout column gets here
        raise UserError(f"{src}: column {HELDOUT}: " + ("every image is held out, none left to train on"
                                                        if held.all() else "no image is held out for evaluation"))
    columns = [*COLUMNS, HELDOUT] if HELDOUT in df.columns else COLUMNS
    write_text(dest, _to_csv(df[columns].values.tolist(), columns))
    log.info("%s: %d rows (%s), %d of them held out", src, len(df),
             " and ".join(f"{n} {s}" for s, n in df["Split"].value_counts().sort_index().items()), int(held.sum()))
    return df
