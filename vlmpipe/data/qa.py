"""The CIFAR question/answer CSV: its columns and the reader that validates a CSV.

Columns: ``Dataset_Index, Class_Label, Split, Q1..Q5, A1..A5, T1..T5``; one
row per image of each split, ``Dataset_Index`` indexing that split's images
and ``T`` giving the question type. build_cifar_qa_csv generates it
(``vlmpipe/sources/qa.py``) or validates a user's CSV with ``read_qa_csv``.
"""
from __future__ import annotations

import csv
import io
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


def with_article(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def qa_frame(rows: list[list[Any]]) -> pd.DataFrame:
    """Rows in ``COLUMNS`` order as the frame every reader of the CSV gets."""
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
    return qa_frame(rows)
