"""The CIFAR question/answer CSV: its columns and the reader that validates a CSV.

Columns: ``Dataset_Index, Class_Label, Split, Q1..Q5, A1..A5, T1..T5``; one
row per image, ``Dataset_Index`` indexing the images of its ``Split`` and
``T`` giving the question type. An optional ``Heldout`` column ("yes"/"no")
marks the images held out for evaluation; without it the test split is held
out. build_cifar_qa_csv generates it (``vlmpipe/sources/qa.py``) or writes a
user's CSV in these columns once ``read_qa_csv`` has validated it (users'
files may order the columns as they like, add others, and leave out
``Split``, ``T1..T5`` and ``Heldout``: see inputs/README.md).
"""
from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vlmpipe.core.errors import UserError
from vlmpipe.data.cifar import SPLITS, load_split

N_QUESTIONS = 5
Q_COLS = [f"Q{k}" for k in range(1, N_QUESTIONS + 1)]
A_COLS = [f"A{k}" for k in range(1, N_QUESTIONS + 1)]
T_COLS = [f"T{k}" for k in range(1, N_QUESTIONS + 1)]
COLUMNS = ["Dataset_Index", "Class_Label", "Split", *Q_COLS, *A_COLS, *T_COLS]
HELDOUT = "Heldout"

log = logging.getLogger(__name__)


def with_article(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def qa_frame(rows: list[list[Any]], columns: list[str] = COLUMNS) -> pd.DataFrame:
    """Rows in ``columns`` order (``COLUMNS``, and ``Heldout`` where the CSV has it) as the frame every
    reader of the CSV gets."""
    df = pd.DataFrame(rows, columns=columns)
    df["Dataset_Index"] = df["Dataset_Index"].astype(np.int64)
    return df


def heldout(df: pd.DataFrame) -> pd.Series:
    """Per row: is its image held out for evaluation? The ``Heldout`` column where the CSV has one,
    else the test split."""
    if HELDOUT in df.columns:
        return df[HELDOUT] == "yes"
    return df["Split"] == "test"


def part(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """The training rows (``name`` "train") or the held-out ones ("test")."""
    if name not in SPLITS:
        raise ValueError(f"part: 'train' or 'test', got {name!r}")
    held = heldout(df)
    return df[held if name == "test" else ~held]


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
    return [f"a photo of {with_article(n)}" for n in label_names]


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


def _read_rows(path: Path) -> tuple[list[str], list[tuple[str, dict[str, str]]]]:
    """The header and the non-blank data rows of the CSV at ``path`` as (where, {column: stripped cell})."""
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
    rows = []
    while True:
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise UserError(f"{path}: data row {len(rows) + 1} (line {reader.line_num}): not valid CSV ({e})") from None
        if not rec or all(not c.strip() for c in rec):
            continue  # blank line
        where = f"{path}: data row {len(rows) + 1} (line {reader.line_num})"
        if len(rec) != len(header):
            raise UserError(f"{where}: {len(rec)} fields, the header has {len(header)}")
        rows.append((where, dict(zip(header, (c.strip() for c in rec)))))
    if not rows:
        raise UserError(f"{path}: no data rows")
    return header, rows


def _image(where: str, get: dict[str, str], split: str, data, hint: str = "") -> tuple[int, str]:
    """(Dataset_Index, class name) of a row whose index and label fit image ``Dataset_Index`` of ``data``."""
    raw = get["Dataset_Index"]
    if not re.fullmatch(r"[0-9]+", raw):
        raise UserError(f"{where}, column Dataset_Index: {_show(raw)} is not a non-negative integer")
    idx = int(raw)
    if idx >= len(data):
        raise UserError(f"{where}, column Dataset_Index: {idx} is out of range (the {split} split has "
                        f"{len(data)} images, 0..{len(data) - 1}){hint}")
    true = data.label_names[data.labels[idx]]
    label = get["Class_Label"]
    if label not in (true, str(int(data.labels[idx]))):
        raise UserError(f"{where}, column Class_Label: {_show(label)} does not match {split} image {idx}, "
                        f"which is {_show(true)}{hint}")
    return idx, true


def _matched_rows(rows: list, data) -> int:
    """How many leading rows name an image of ``data`` by index and label."""
    for k, (where, get) in enumerate(rows):
        try:
            _image(where, get, "", data)
        except UserError:
            return k
    return len(rows)


def _detect_split(path: Path, rows: list, load) -> tuple[str, str]:
    """(split, hint for errors) of a CSV without a Split column: the split whose images match every row
    by Dataset_Index and Class_Label (train when both do); when neither does, the one matching more
    leading rows, so that its first mismatch is the error."""
    matched = {split: _matched_rows(rows, load(split)) for split in SPLITS}
    full = [s for s in SPLITS if matched[s] == len(rows)]
    if full:
        if len(full) > 1:
            log.warning("%s: no Split column, and every row matches both CIFAR splits: read as the train split "
                        "(qa.split chooses)", path)
        else:
            log.info("%s: no Split column; Dataset_Index read as the %s split (every Class_Label matches it)",
                     path, full[0])
        return full[0], ""
    split = max(SPLITS, key=lambda s: matched[s])
    k = matched[split]
    return split, (f" (no Split column: rows 1-{k} match the {split} split; qa.split names the split)" if k else
                   " (no Split column, and this row matches neither CIFAR split)")


def read_qa_csv(path: str | os.PathLike, cifar_root: str | os.PathLike, split: str = "auto") -> pd.DataFrame:
    """Read and validate a Q/A CSV against the CIFAR images in ``cifar_root``.

    Every problem is one ``UserError`` line naming the file, the data row
    (1-based, header excluded) with its line in the file, and the column.
    Columns are found by name, in any order; others (``Image_Number``,
    ``Concat_Q``, ...) are ignored. ``T1..T5`` default to "unknown". Without a
    ``Split`` column every row indexes one split: ``split`` ("train" or
    "test"), or with "auto" the one whose labels match every row. With one,
    ``split`` other than "auto" must be what each row says. ``Heldout``
    ("yes"/"no", the same for every row of an image) is kept when present.
    """
    path = Path(path)
    header, rows = _read_rows(path)
    splits: dict[str, Any] = {}

    def load(s: str):
        if s not in splits:
            splits[s] = load_split(cifar_root, s)
        return splits[s]

    hint = ""
    if "Split" not in header:
        if split == "auto":
            split, hint = _detect_split(path, rows, load)
        else:
            hint = f" (no Split column; qa.split is {split!r})"
    has_heldout = HELDOUT in header
    held_by_image: dict[tuple[str, int], tuple[str, int]] = {}
    out = []
    for row_no, (where, get) in enumerate(rows, start=1):
        row_split = get.get("Split", split)
        if row_split not in SPLITS:
            raise UserError(f"{where}, column Split: unknown split {_show(row_split)} (expected 'train' or 'test')")
        if split != "auto" and row_split != split:
            raise UserError(f"{where}, column Split: {_show(row_split)}, but qa.split is {split!r}")
        idx, true = _image(where, get, row_split, load(row_split), hint)

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
        row = [idx, true, row_split, *qs, *ans, *ts]
        if has_heldout:
            held = get[HELDOUT]
            if held not in ("yes", "no"):
                raise UserError(f"{where}, column {HELDOUT}: {_show(held)} (expected 'yes' or 'no')")
            first = held_by_image.setdefault((row_split, idx), (held, row_no))
            if first[0] != held:
                raise UserError(f"{where}, column {HELDOUT}: {held!r}, but data row {first[1]} about the same "
                                f"{row_split} image {idx} says {first[0]!r} (an image is held out with all its rows)")
            row.append(held)
        out.append(row)
    return qa_frame(out, [*COLUMNS, HELDOUT] if has_heldout else COLUMNS)
