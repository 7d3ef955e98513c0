"""The CIFAR question/answer CSV: generation and validation.

Columns: ``Dataset_Index, Class_Label, Split, Q1..Q5, A1..A5, T1..T5``; one
row per image of each split, ``Dataset_Index`` indexing that split's images
and ``T`` giving the question type.

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
"""
from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from vlmpipe.data import shapes
from vlmpipe.data.cifar import SPLITS, load_split
from vlmpipe.core.errors import UserError
from vlmpipe.core.io import write_text

log = logging.getLogger(__name__)

N_QUESTIONS = 5
Q_COLS = [f"Q{k}" for k in range(1, N_QUESTIONS + 1)]
A_COLS = [f"A{k}" for k in range(1, N_QUESTIONS + 1)]
T_COLS = [f"T{k}" for k in range(1, N_QUESTIONS + 1)]
COLUMNS = ["Dataset_Index", "Class_Label", "Split", *Q_COLS, *A_COLS, *T_COLS]

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


def _article(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


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
                qs.append(template.format(a_label=_article(ask)))
                ans.append("yes" if ask == label else "no")
            else:
                qs.append(template.format(noun=noun))
                ans.append(answers[qtype])
        pad = N_QUESTIONS - len(chosen)
        rows.append([idx, label, split, *qs, *[""] * pad, *ans, *[""] * pad, *chosen, *[""] * pad])
    return rows


def _to_csv(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    w.writerows(rows)
    return buf.getvalue()


def write_qa_csv(dest: str | os.PathLike, cifar_root: str | os.PathLike, seed: int, questions_per_image: int = N_QUESTIONS) -> pd.DataFrame:
    """Generate the Q/A CSV for both splits of ``cifar_root``, write it atomically, return it."""
    rows = []
    for split in SPLITS:
        rows += generate_rows(load_split(cifar_root, split), split, seed, questions_per_image)
    write_text(dest, _to_csv(rows))
    df = _frame(rows)
    log.info("%s: %d rows", dest, len(df))
    return df


def _frame(rows: list[list[Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["Dataset_Index"] = df["Dataset_Index"].astype(np.int64)
    return df


def qa_pairs(df: pd.DataFrame) -> list[tuple[int, str, str, str, str]]:
    """Every non-empty (row, split, question, answer, type) in the frame."""
    out = []
    for r in df.itertuples(index=False):
        d = r._asdict()
        for q, a, t in zip(Q_COLS, A_COLS, T_COLS):
            if d[q]:
                out.append((d["Dataset_Index"], d["Split"], d[q], d[a], d[t]))
    return out


def class_prompts(label_names: list[str]) -> list[str]:
    """Zero-shot prompts, one per class: "a photo of a cat", "a photo of an airplane"."""
    return [f"a photo of {_article(n)}" for n in label_names]


def csv_texts(df: pd.DataFrame) -> list[str]:
    """All questions and answers of the CSV in row order (for tokenizer training)."""
    out = []
    for r in df[Q_COLS + A_COLS].itertuples(index=False):
        for q, a in zip(r[:N_QUESTIONS], r[N_QUESTIONS:]):
            if q:
                out.extend((q, a))
    return out


# --- validation of a user CSV ------------------------------------------------------

def _show(v: str) -> str:
    return repr(v if len(v) <= 40 else v[:37] + "...")


def read_qa_csv(path: str | os.PathLike, cifar_root: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a Q/A CSV against the CIFAR images in ``cifar_root``.

    Every problem is one ``UserError`` line naming the file, the data row
    (1-based, header excluded) with its line in the file, and the column.
    ``Split`` defaults to "train" and ``T1..T5`` to "unknown" when absent
    (the original framework's CSVs have neither).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{path}: Q/A CSV not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: a folder, not a Q/A CSV file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e})") from None
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise UserError(f"{path}: empty file (expected a header row: {', '.join(COLUMNS)})") from None
    except csv.Error as e:
        raise UserError(f"{path}: line 1 (header): not valid CSV ({e})") from None
    for col in ["Dataset_Index", "Class_Label", *Q_COLS, *A_COLS]:
        if col not in header:
            raise UserError(f"{path}: line 1 (header): missing column {col}")
    dup = [c for c, n in Counter(header).items() if n > 1]
    if dup:
        raise UserError(f"{path}: line 1 (header): duplicate column {dup[0]}")

    splits: dict[str, Any] = {}
    rows = []
    row_no = 0
    while True:
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise UserError(f"{path}: data row {row_no + 1} (line {reader.line_num}): not valid CSV ({e})") from None
        if not rec or all(not c.strip() for c in rec):
            continue  # blank line
        row_no += 1
        where = f"{path}: data row {row_no} (line {reader.line_num})"
        if len(rec) != len(header):
            raise UserError(f"{where}: {len(rec)} fields, the header has {len(header)}")
        get = dict(zip(header, (c.strip() for c in rec)))

        split = get.get("Split", "train")
        if split not in SPLITS:
            raise UserError(f"{where}, column Split: unknown split {_show(split)} (expected 'train' or 'test')")
        if split not in splits:
            splits[split] = load_split(cifar_root, split)
        data = splits[split]

        raw = get["Dataset_Index"]
        if not re.fullmatch(r"[0-9]+", raw):
            raise UserError(f"{where}, column Dataset_Index: {_show(raw)} is not a non-negative integer")
        idx = int(raw)
        if idx >= len(data):
            raise UserError(f"{where}, column Dataset_Index: {idx} is out of range (the {split} split has {len(data)} images, 0..{len(data) - 1})")

        true = data.label_names[data.labels[idx]]
        label = get["Class_Label"]
        if label not in (true, str(int(data.labels[idx]))):
            raise UserError(f"{where}, column Class_Label: {_show(label)} does not match {split} image {idx}, which is {_show(true)}")

        qs, ans, ts = [], [], []
        for q_col, a_col, t_col in zip(Q_COLS, A_COLS, T_COLS):
            q, a = get[q_col], get[a_col]
            if q and not a:
                raise UserError(f"{where}, column {a_col}: empty answer to {q_col}")
            if a and not q:
                raise UserError(f"{where}, column {q_col}: empty question for answer {a_col}")
            qs.append(q)
            ans.append(a)
            ts.append((get.get(t_col) or "unknown") if q else "")
        if not any(qs):
            raise UserError(f"{where}, column Q1: the row has no question")
        rows.append([idx, true, split, *qs, *ans, *ts])
    if not rows:
        raise UserError(f"{path}: no data rows")
    return _frame(rows)
