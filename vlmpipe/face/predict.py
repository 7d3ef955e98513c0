"""``python -m vlmpipe predict``: caption, or answer questions about, many images in one call.

INPUT is a folder of images, a CSV or a JSON Lines file; the output is JSON Lines, one record per
input in input order: the input's fields plus ``caption`` (a captioner) or ``answer`` (a QA or chat
model), or ``error``, one line saying what is wrong with that row (an unreadable image, a missing
question). A bad row never stops the run. Image paths are relative to the input file's folder.

- folder: its image files (by suffix, not recursive), sorted by name; ``--question`` asks each one.
- CSV: a header with an ``image`` (or ``image_path``) column and optionally ``question``; other
  columns are passed through.
- JSON Lines: ``{"image": path, "question": "..."}`` or ``{"image": path, "messages": [{"role":
  "user", "content": "..."}, {"role": "assistant", ...}, ..., {"role": "user", ...}]}`` (the
  earlier turns are the history of the last message); other fields are passed through.

Everything runs through the inference API of ``vlmpipe.face.api``: the model is loaded once, the
images are featurised as the training cache was, ``batch_size`` at a time, and captioned or
answered in the same batches.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, TextIO

import torch

from vlmpipe.core.errors import UserError, one_line
from vlmpipe.face.images import read_image

log = logging.getLogger("vlmpipe.face.predict")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
IMAGE_COLUMNS = ("image", "image_path")
KINDS = {"captioner": "caption", "qa": "answer", "chat": "answer"}  # model kind -> the field it writes


@dataclass
class Row:
    """One input: the fields echoed back, and what the model is asked (or why the row cannot be)."""
    fields: dict
    where: str                       # names the row in errors: "data.csv line 3", "photos/a.png"
    image: Path | None = None
    question: str | None = None
    history: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None


# ------------------------------------------------------------------ reading the input

def read_rows(path: str | os.PathLike, question: str | None = None) -> list[Row]:
    """The rows of INPUT (a folder, a CSV, a JSON Lines file); ``question`` asks rows that have none."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: not found (INPUT: a folder of images, a .csv or a .jsonl file)")
    if path.is_dir():
        rows = _folder_rows(path)
    elif path.suffix.lower() == ".csv":
        rows = _csv_rows(path)
    elif path.suffix.lower() in JSONL_SUFFIXES:
        rows = _jsonl_rows(path)
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        raise UserError(f"{path}: one image; predict takes a folder, a .csv or a .jsonl file "
                        "(for one image use `python -m vlmpipe caption` or `ask`)")
    else:
        raise UserError(f"{path}: not a folder, .csv or .jsonl file (INPUT's kind is told by its suffix)")
    for r in rows:
        if r.error is None and r.question is None and question is not None:
            r.question = r.fields["question"] = question  # the record says what was asked
    return rows


def _folder_rows(folder: Path) -> list[Row]:
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not names:
        raise UserError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
    return [Row({"image": n}, str(folder / n), image=folder / n) for n in names]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None


def _image_path(base: Path, value) -> Path | None:
    """The image a row names, relative to the input file's folder (None: the row names none)."""
    if not isinstance(value, str) or not value.strip():
        return None
    p = Path(value.strip())
    return p if p.is_absolute() else base / p


def _csv_rows(path: Path) -> list[Row]:
    reader = csv.reader(io.StringIO(_read_text(path)))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise UserError(f"{path}: empty file (expected a header row with an image column)") from None
    except csv.Error as e:
        raise UserError(f"{path}: line 1 (header): not valid CSV ({e})") from None
    col = next((c for c in IMAGE_COLUMNS if c in header), None)
    if col is None:
        raise UserError(f"{path}: line 1 (header): no image column (name one 'image' or 'image_path'; "
                        f"the header has {', '.join(header[:8]) or 'nothing'})")
    rows = []
    while True:
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise UserError(f"{path}: line {reader.line_num}: not valid CSV ({e})") from None
        if not rec or all(not c.strip() for c in rec):
            continue
        where = f"{path} line {reader.line_num}"
        fields = dict(zip(header, rec))
        row = Row(fields, where)
        if len(rec) != len(header):
            row.error = f"{where}: {len(rec)} fields, the header has {len(header)}"
        else:
            row.image = _image_path(path.parent, fields[col])
            row.error = None if row.image else f"{where}: column {col} is empty"
            q = fields.get("question", "")
            row.question = q if q.strip() else None
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no data rows after the header")
    return rows


def _jsonl_rows(path: Path) -> list[Row]:
    text = _read_text(path)
    if text.lstrip().startswith("["):  # a .json file holding one list of records
        try:
            records = json.loads(text)
        except ValueError as e:
            raise UserError(f"{path}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
        lines = [(f"{path} record {i}", r, None) for i, r in enumerate(records, 1)]
    else:
        lines = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                lines.append((f"{path} line {n}", json.loads(line), None))
            except (ValueError, RecursionError) as e:
                lines.append((f"{path} line {n}", {}, f"not valid JSON ({str(e).splitlines()[0][:120]})"))
    if not lines:
        raise UserError(f"{path}: no records (one JSON object a line: {{\"image\": ..., \"question\": ...}})")
    return [_record_row(path.parent, where, rec, bad) for where, rec, bad in lines]


def _record_row(base: Path, where: str, rec, bad: str | None) -> Row:
    if bad is None and not isinstance(rec, dict):
        bad = f"a JSON {type(rec).__name__}, not an object with an image field"
    row = Row(rec if isinstance(rec, dict) else {}, where)
    if bad:
        row.error = f"{where}: {bad}"
        return row
    row.image = _image_path(base, rec.get("image"))
    if row.image is None:
        row.error = f"{where}: no image (the field image: a path relative to {base})"
    elif "messages" in rec:
        if "question" in rec:
            row.error = f"{where}: both question and messages (give one)"
        else:
            try:
                row.question, row.history = _messages(rec["messages"])
            except ValueError as e:
                row.error = f"{where}: messages: {e}"
    elif "question" in rec:
        if not isinstance(rec["question"], str):
            row.error = f"{where}: question is a {type(rec['question']).__name__}, not text"
        else:
            row.question = rec["question"]
    return row


def _messages(msgs) -> tuple[str, list[tuple[str, str]]]:
    """(the last user message, the earlier (user, assistant) turns) of a messages list."""
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("a non-empty list of {\"role\": ..., \"content\": ...} objects is expected")
    texts = []
    for i, m in enumerate(msgs):
        want = "user" if i % 2 == 0 else "assistant"
        if not isinstance(m, dict) or m.get("role") != want:
            got = m.get("role") if isinstance(m, dict) else type(m).__name__
            raise ValueError(f"message {i + 1} should have role {want} (turns alternate, user first), got {got!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i + 1}: content should be text")
        texts.append(m["content"])
    if len(texts) % 2 == 0:
        raise ValueError("the last message should be the user's (the one to answer)")
    return texts[-1], list(zip(texts[0:-1:2], texts[1:-1:2]))


# ------------------------------------------------------------------ the model

def load_model(model_dir: str | os.PathLike, device: str = "auto"):
    """The captioner, QA or chat model in ``model_dir`` (its kind is in its model.json), an export included."""
    from vlmpipe.core.io import read_json_file
    from vlmpipe.face.api import quiet_loading
    from vlmpipe.models.lm.prefix_lm import CONFIG_NAME

    d = Path(model_dir)
    if not d.is_dir():
        raise UserError(f"--model: {d} is not a folder (a captioner, QA or chat model folder, e.g. models/captioner)")
    if not (d / CONFIG_NAME).is_file():
        raise UserError(f"--model: {d} has no {CONFIG_NAME}: not a captioner, QA or chat model folder")
    cfg = read_json_file(d / CONFIG_NAME)
    kind = cfg.get("kind")
    with quiet_loading():
        if kind == "captioner":
            from vlmpipe.models.captioner import load_captioner
            return load_captioner(d, device)
        if kind == "chat":
            from vlmpipe.models.chat_model import load_chat_model
            return load_chat_model(d, device)
        if kind == "qa":
            from vlmpipe.models.qa_model import load_qa_model
            return load_qa_model(d, device)
    raise UserError(f"{d / CONFIG_NAME}: kind {kind!r}; predict takes a captioner, qa or chat model")


# ------------------------------------------------------------------ predicting

def predict_rows(model, rows: list[Row], batch_size: int = 32) -> Iterator[dict]:
    """An output record per row, in order: the row's fields plus ``caption``/``answer``, or ``error``.

    Images are decoded, featurised and captioned or answered ``batch_size`` rows at a time."""
    from tqdm import tqdm

    from vlmpipe.face.api import featurizer

    out_key = KINDS[model.config.kind]
    encode = featurizer(model)  # the encoder loads once, not per batch
    with tqdm(total=len(rows), desc="predict", unit="img", file=sys.stderr, dynamic_ncols=True, mininterval=1.0,
              disable=len(rows) <= batch_size) as bar:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            images = {}
            for i, r in enumerate(chunk):
                if r.error is None and out_key == "answer" and (r.question is None or not r.question.strip()):
                    r.error = (f"{r.where}: no question (a question field or column, messages, or --question)"
                               if r.question is None else f"{r.where}: the question is empty")
                if r.error is None:
                    try:
                        images[i] = read_image(r.image)
                    except UserError as e:
                        r.error = str(e)
            texts: dict[int, str] = {}
            if images:
                idx = list(images)
                with torch.no_grad():  # as api.featurize: the batch through the model's own encoder
                    feats = encode([images[i] for i in idx]).float().cpu()
                if out_key == "caption":
                    answers = model.caption(feats, batch_size=len(idx))
                else:
                    answers = model.answer(feats, [chunk[i].question for i in idx], [chunk[i].history for i in idx])
                texts = dict(zip(idx, answers))
            for i, r in enumerate(chunk):
                rec = dict(r.fields)
                if i in texts:
                    rec[out_key] = texts[i]
                else:
                    rec["error"] = one_line(r.error or "no output")
                yield rec
            bar.update(len(chunk))


def run(model_dir: str | os.PathLike, input_path: str | os.PathLike, output: str | os.PathLike | None = None,
        device: str = "auto", batch_size: int = 32, question: str | None = None,
        stdout: TextIO | None = None) -> dict:
    """Predict every row of ``input_path`` into ``output`` (JSON Lines, written whole or not at all) or
    stdout. Returns {"records": n, "errors": k}."""
    from vlmpipe.core.io import atomic_path

    if batch_size < 1:
        raise UserError(f"--batch-size: must be >= 1, got {batch_size}")
    if question is not None and not question.strip():
        raise UserError("--question: empty")
    rows = read_rows(input_path, question)  # a bad INPUT is refused before any model loads
    out = Path(output) if output is not None else None
    if out is not None:
        if out.is_dir():
            raise UserError(f"--output: {out} is a folder (name a .jsonl file)")
        if out.exists() and out.resolve() == Path(input_path).resolve():
            raise UserError(f"--output: {out} is the input file")
        if not out.parent.is_dir():
            raise UserError(f"--output: {out.parent} does not exist (create the folder first)")
    model = load_model(model_dir, device)
    if question is not None and model.config.kind == "captioner":
        raise UserError(f"--question: {model_dir} is a captioner, which takes no question (use a QA or chat model)")
    counts = {"records": 0, "errors": 0}

    def write(f: TextIO) -> None:
        for rec in predict_rows(model, rows, batch_size):
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            counts["records"] += 1
            counts["errors"] += "error" in rec

    if out is None:
        write(stdout or sys.stdout)
    else:
        with atomic_path(out) as tmp:  # a failed run leaves the old file, or none: never half a file
            with open(tmp, "w", encoding="utf-8") as f:
                write(f)
    log.info("%d records%s, %d with an error", counts["records"], f" to {out}" if out else "", counts["errors"])
    return counts
