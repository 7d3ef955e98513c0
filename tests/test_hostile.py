"""Hostile inputs, generated: every user-facing entry gets malformed and adversarial inputs.

The contract, for every case: the entry either works, or raises one ``UserError`` whose single
line names the file, row or key (a stage or the CLI then exits 2 with that line, no traceback);
an earlier output stays byte-identical; nothing is written outside the output's folder; no
partial output is left looking valid. Structured inputs are generated with hypothesis, the rest
by byte-level mutation of valid files. Seeds and example counts are fixed (``derandomize``), so
CI runs the same cases every time; EXAMPLES is the number per entry.
"""
from __future__ import annotations

import csv
import io
import json
import random
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmpipe.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = 60
SETTINGS = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Text that means something to a renderer, a shell, a template or a CSV reader.
NASTY = ["<script>alert(1)</script>", "=cmd|' /C calc'!A0", "$x^2$ and $", "{{7*7}} ${HOME} %s %(x)s",
         "a,b\nc\"d", "\u202eevil\u202c", "👩‍👩‍👧 ✓ ☃", "\\x00\\n", "'; DROP TABLE runs; --", "ﷺ" * 30,
         "`rm -rf /`", "\t tab\r\n", "&amp;&lt;", "../../etc/passwd", "\\"]
ANY_TEXT = st.one_of(st.sampled_from(NASTY), st.text(min_size=1, max_size=40))


# What a user-facing line must never hold: a scratch folder of the project's (gone by the time the line
# is read: the user's file and member are what to name) or a Python object's repr.
SCRATCH = re.compile(r"/\.[^/\s]+\.tmp(/|\b)|/\.(coco-src|extract)[.-][^/\s]+|vlmpipe-(mlflow-model|kernel)-")
OBJECT_REPR = re.compile(r"<[A-Za-z_][\w.]* object at 0x[0-9a-fA-F]+>")


def one_line(e: pytest.ExceptionInfo | UserError, *names: str) -> str:
    """The message of a refusal, checked: one line, no traceback, no scratch path, no object repr, and
    (given ``names``) naming one of them."""
    msg = str(e.value if isinstance(e, pytest.ExceptionInfo) else e)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    assert not SCRATCH.search(msg) and not OBJECT_REPR.search(msg), msg
    if names:
        assert any(n in msg for n in names), (msg, names)
    return msg


def mutations(data: bytes, n: int, seed: int) -> list[bytes]:
    """``n`` byte-level mutants of ``data``: flips, cuts, insertions, duplicated and zeroed spans."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        b = bytearray(data)
        kind = i % 5
        if kind == 0 and b:  # flip a few bytes
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncate
            b = b[: rng.randrange(len(b) + 1)]
        elif kind == 2:  # insert garbage
            p = rng.randrange(len(b) + 1)
            b[p:p] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        elif kind == 3 and b:  # duplicate a span
            p, q = sorted(rng.randrange(len(b)) for _ in range(2))
            b[q:q] = b[p:q]
        elif b:  # zero a span
            p = rng.randrange(len(b))
            b[p: p + rng.randint(1, 256)] = bytes(min(256, len(b) - p))
        out.append(bytes(b))
    return out


# ------------------------------------------------------------------ params files

def _keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out += _keys(v, key) if isinstance(v, dict) else [key]
    return out


PARAM_KEYS = _keys(yaml.safe_load((ROOT / "params.yaml").read_text()))
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                   ANY_TEXT, st.lists(st.integers(), max_size=3), st.dictionaries(ANY_TEXT, st.integers(), max_size=2))


@SETTINGS
@given(st.dictionaries(st.one_of(st.sampled_from(PARAM_KEYS), ANY_TEXT), VALUES, min_size=1, max_size=4))
def test_params_with_generated_values(tmp_path_factory, overrides):
    from vlmpipe.ops.preflight import load_all as load_params

    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in overrides.items():
        node, parts = data, str(key).split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
        node[parts[-1]] = value
    f = tmp_path_factory.mktemp("p") / "params.yaml"
    f.write_text(yaml.safe_dump(data, allow_unicode=True))
    try:
        assert load_params(f).seed >= 0
    except UserError as e:
        one_line(e, str(f))


def test_params_files_mutated_bytewise(tmp_path):
    from vlmpipe.ops.preflight import load_all as load_params

    for i, m in enumerate(mutations((ROOT / "params.yaml").read_bytes(), EXAMPLES, seed=1)):
        f = tmp_path / f"params{i}.yaml"
        f.write_bytes(m)
        try:
            assert load_params(f).seed >= 0
        except UserError as e:
            one_line(e, str(f))


@pytest.mark.parametrize("content, words", [
    (b"", "empty params file"),
    (b"seed: 1\nseed: 2\n", "key 'seed' given twice"),
    (b"\xff\xfeseed: 1\n", "not UTF-8"),
    (b"a: " + b"[" * 100_000 + b"\n", "nested"),
    (b"seed: 18446744073709551616\n", "seed: must be between 0 and 4294967295"),
    (b"phi2:\n  target_modules: [q_proj, nonsense]\n", None),  # valid params; refused by the stage (below)
])
def test_params_that_used_to_crash_later_or_fall_back_silently(tmp_path, content, words):
    from vlmpipe.ops.preflight import load_all as load_params

    f = tmp_path / "params.yaml"
    f.write_bytes(content)
    if words is None:
        load_params(f)
        return
    with pytest.raises(UserError) as e:
        load_params(f)
    assert words in one_line(e, str(f))
    with pytest.raises(UserError, match="not a file"):
        load_params(tmp_path)


# ------------------------------------------------------------------ Q/A CSV

def test_qa_csv_mutated_bytewise(qa_csv, tiny_cifar, tmp_path):
    from vlmpipe.data.qa import read_qa_csv

    for i, m in enumerate(mutations(qa_csv.read_bytes(), EXAMPLES, seed=2)):
        f = tmp_path / f"qa{i}.csv"
        f.write_bytes(m)
        try:
            read_qa_csv(f, tiny_cifar)
        except UserError as e:
            one_line(e, str(f))


@SETTINGS
@given(st.data())
def test_qa_csv_cells_replaced_with_arbitrary_text(qa_csv, tiny_cifar, tmp_path_factory, data):
    """Any text in any cell: either read back exactly (questions and answers round-trip through the
    CSV reader untouched) or refused naming the row and column."""
    from vlmpipe.data.qa import read_qa_csv

    rows = list(csv.reader(io.StringIO(qa_csv.read_text())))
    r = data.draw(st.integers(1, min(len(rows) - 1, 20)))
    c = data.draw(st.integers(0, len(rows[0]) - 1))
    value = data.draw(ANY_TEXT)
    rows[r][c] = value
    f = tmp_path_factory.mktemp("q") / "qa.csv"
    with open(f, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    try:
        df = read_qa_csv(f, tiny_cifar)
    except UserError as e:
        one_line(e, str(f))
        return
    col = rows[0][c]
    if col.startswith(("Q", "A")) and value.strip():
        assert " ".join(str(df.iloc[r - 1][col]).split()) == " ".join(value.split())


def test_qa_csv_path_is_a_folder(tiny_cifar, tmp_path):
    from vlmpipe.data.qa import read_qa_csv

    with pytest.raises(UserError) as e:
        read_qa_csv(tmp_path, tiny_cifar)
    assert one_line(e) == f"{tmp_path}: a folder, not a Q/A CSV file"


def _one_split_csv(path: Path, cifar_root: Path, rows: list[int], extra: dict | None = None) -> Path:
    """The origin project's columns (no Split) about test images ``rows`` of ``cifar_root``; ``extra``:
    column -> one value per row."""
    from vlmpipe.data.cifar import load_split

    test = load_split(cifar_root, "test")
    extra = extra or {}
    header = ["Image_Number", "Dataset_Index", "Class_Label", *[f"{c}{k}" for k in range(1, 6) for c in "QA"],
              "Concat_Q", "Concat_A", *extra]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for n, i in enumerate(rows):
            qa = [x for k in range(1, 6) for x in (f"Question {k}?", "No" if k % 2 else "The image is blurry.")]
            w.writerow([f"{i:05d}", i, test.label_names[test.labels[i]], *qa, '"Question 1?"', '"No"',
                        *[v[n] for v in extra.values()]])
    return path


@pytest.mark.parametrize("rows, extra, params, words", [
    ([3], None, {}, "every row is about test image 3; holding images out for evaluation needs rows about two"),
    ([3, 3], None, {}, "every row is about test image 3"),
    ([0, 1, 2], {"Heldout": ["no", "no", "no"]}, {}, "column Heldout: no image is held out for evaluation"),
    ([0, 1], {"Heldout": ["yes", "yes"]}, {}, "column Heldout: every image is held out, none left to train on"),
    ([0, 1], {"Heldout": ["no", "maybe"]}, {}, "data row 2 (line 3), column Heldout: 'maybe' (expected 'yes' or 'no')"),
    ([0, 1, 0], {"Heldout": ["yes", "no", "no"]}, {},
     "data row 3 (line 4), column Heldout: 'no', but data row 1 about the same test image 0 says 'yes'"),
    ([0, 1], {"Split": ["test", "test"]}, {"split": "train"},
     "data row 1 (line 2), column Split: 'test', but qa.split is 'train'"),
    ([0, 1], {"Split": ["test", "validation"]}, {}, "data row 2 (line 3), column Split: unknown split 'validation'"),
])
def test_qa_csv_split_requirements_are_checked_at_build(tiny_cifar, tmp_path, rows, extra, params, words):
    """Whatever a later stage needs of the splits (training and held-out rows, an image held out whole)
    is refused when build_cifar_qa_csv reads the CSV: one line naming the file and row, nothing written."""
    from vlmpipe.sources.qa import write_user_csv

    src = _one_split_csv(tmp_path / "user.csv", tiny_cifar, rows, extra)
    dest = tmp_path / "out" / "cifar_qa.csv"
    with pytest.raises(UserError) as e:
        write_user_csv(src, dest, tiny_cifar, params.get("split", "auto"), 0.1, 0)
    msg = one_line(e, str(src))
    assert msg.startswith(f"{src}: ") and words in msg, msg
    assert not dest.exists()


def test_a_csv_matching_neither_split_says_so(tiny_cifar, tmp_path):
    from vlmpipe.data.cifar import load_split
    from vlmpipe.data.qa import read_qa_csv

    train, test = load_split(tiny_cifar, "train"), load_split(tiny_cifar, "test")
    src = _one_split_csv(tmp_path / "user.csv", tiny_cifar, [0, 1])
    text = src.read_text(encoding="utf-8").splitlines(keepends=True)
    wrong = next(n for n in test.label_names if n not in (train.label_names[train.labels[0]],
                                                          test.label_names[test.labels[0]]))
    text[1] = text[1].replace(f",{test.label_names[test.labels[0]]},", f",{wrong},", 1)
    src.write_text("".join(text), encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_qa_csv(src, tiny_cifar)
    assert one_line(e, str(src)).endswith(f"column Class_Label: {wrong!r} does not match train image 0, which is "
                                          f"{train.label_names[train.labels[0]]!r} (no Split column, and this row "
                                          f"matches neither CIFAR split)")


@SETTINGS
@given(st.data())
def test_one_split_csv_cells_replaced_never_fail_a_later_stage(tiny_cifar, tmp_path_factory, data):
    """The origin project's one-split CSV with any text in any cell: refused in one line naming the file,
    or written with training and held-out rows, every image held out whole, that read back."""
    from vlmpipe.data.qa import heldout, part, read_qa_csv
    from vlmpipe.sources.qa import write_user_csv

    d = tmp_path_factory.mktemp("q")
    src = _one_split_csv(d / "user.csv", tiny_cifar, list(range(12)))
    rows = list(csv.reader(io.StringIO(src.read_text(encoding="utf-8"))))
    r, c = data.draw(st.integers(1, len(rows) - 1)), data.draw(st.integers(0, len(rows[0]) - 1))
    rows[r][c] = data.draw(ANY_TEXT)
    with open(src, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    try:
        write_user_csv(src, d / "cifar_qa.csv", tiny_cifar, "auto", data.draw(st.floats(0.01, 0.99)), 0)
    except UserError as e:
        one_line(e, str(src))
        return
    df = read_qa_csv(d / "cifar_qa.csv", tiny_cifar)
    assert len(part(df, "train")) and len(part(df, "test"))
    held = heldout(df)
    assert not set(df.Dataset_Index[held]) & set(df.Dataset_Index[~held])


# ------------------------------------------------------------------ COCO captions and archives

def _annotations_zip(path: Path, captions: dict) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for split in ("train", "val"):
            zf.writestr(f"annotations/captions_{split}2017.json", json.dumps(captions[split]))
    return path


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | ANY_TEXT,
                       lambda kids: st.lists(kids, max_size=3) | st.dictionaries(ANY_TEXT, kids, max_size=3),
                       max_leaves=8)


@SETTINGS
@given(st.fixed_dictionaries({"images": st.one_of(JSONISH, st.lists(st.fixed_dictionaries(
    {"id": st.one_of(st.integers(0, 3), ANY_TEXT), "file_name": st.one_of(ANY_TEXT, st.integers())}), max_size=3)),
    "annotations": st.one_of(JSONISH, st.lists(st.fixed_dictionaries(
        {"image_id": st.one_of(st.integers(0, 3), st.none()), "caption": st.one_of(ANY_TEXT, st.integers())}),
        max_size=4))}))
def test_coco_caption_files_generated(tiny_coco, tmp_path_factory, captions):
    from vlmpipe.sources import coco

    src = tmp_path_factory.mktemp("src")
    for name in ("train2017.zip", "val2017.zip"):
        (src / name).write_bytes((tiny_coco / name).read_bytes())
    good = json.loads((tiny_coco / "annotations/captions_val2017.json").read_text())
    _annotations_zip(src / coco.ANNOTATIONS_ZIP, {"train": captions, "val": good})
    out = tmp_path_factory.mktemp("out") / "coco"
    try:
        coco.ingest(src, out, 0, 0)
    except UserError as e:
        one_line(e, str(src))


def test_empty_coco_split_is_refused_at_ingest(tiny_coco, tmp_path):
    """`"images": []` used to pass ingest and crash precompute_embeddings."""
    from vlmpipe.sources import coco

    src = tmp_path / "src"
    src.mkdir()
    for name in ("train2017.zip", "val2017.zip"):
        (src / name).write_bytes((tiny_coco / name).read_bytes())
    val = json.loads((tiny_coco / "annotations/captions_val2017.json").read_text())
    _annotations_zip(src / coco.ANNOTATIONS_ZIP, {"train": {**val, "images": [], "annotations": []}, "val": val})
    with pytest.raises(UserError) as e:
        coco.ingest(src, tmp_path / "out", 0, 0)
    assert "captions_train2017.json has no image with a caption" in one_line(e, coco.ANNOTATIONS_ZIP)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_archives_mutated_bytewise_extract_safely(tmp_path, kind):
    from vlmpipe.core.download import safe_extract

    members = {"d/a.txt": b"alpha" * 200, "d/b.bin": np.random.default_rng(0).bytes(3000), "c.txt": b"gamma"}
    buf = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for n, d in members.items():
                zf.writestr(n, d)
    else:
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for n, d in members.items():
                info = tarfile.TarInfo(n)
                info.size = len(d)
                tf.addfile(info, io.BytesIO(d))
    outside = tmp_path / "outside"
    outside.mkdir()
    for i, m in enumerate(mutations(buf.getvalue(), EXAMPLES, seed=3)):
        arc, dest = tmp_path / f"a{i}.{kind}", tmp_path / f"x{i}" / "dest"
        arc.write_bytes(m)
        try:
            written = safe_extract(arc, dest)
        except UserError as e:
            one_line(e, str(arc))
            assert not dest.exists() or not [p for p in dest.rglob("*") if p.is_file()]  # no partial file
            continue
        for p in written:  # what was written lies inside dest, and is a plain file
            assert dest.resolve() in p.resolve().parents and p.is_file() and not p.is_symlink()
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == \
        sorted(f"a{i}.{kind}" for i in range(EXAMPLES))  # nothing written beside the archives


# ------------------------------------------------------------------ LLaVA conversations

def _llava_file(lines: bool) -> bytes:
    """A LLaVA file in the published shapes: a COCO path with folders, a text-only record, another dataset's."""
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a star"}]
    recs = [{"id": "000000000001", "image": "coco/train2017/000000000001.jpg", "conversations": turns},
            {"id": "i6IyJda_0", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
            {"id": "2354786", "image": "gqa/images/2354786.jpg", "conversations": turns}]
    return ("".join(json.dumps(r) + "\n" for r in recs) if lines else json.dumps(recs, indent=1)).encode()


@pytest.mark.parametrize("lines", [False, True], ids=["json", "json-lines"])
def test_llava_files_mutated_bytewise(tiny_coco, tmp_path, lines):
    from vlmpipe.data import llava
    from vlmpipe.sources.llava import _split_by_image

    for i, m in enumerate(mutations(_llava_file(lines), EXAMPLES, seed=5)):
        f = tmp_path / f"conv{i}.json"
        f.write_bytes(m)
        for text_only in (False, True):
            try:
                records = llava.read(f, check_text_only=text_only)
            except UserError as e:
                one_line(e, str(f))
                continue
            # What reads is usable: split by image (text-only records kept or counted), turns of every record.
            train, val, text, dropped = _split_by_image(records, tiny_coco, 0.5, 0, keep_text_only=text_only)
            assert len(train) + len(val) + len(text) + sum(dropped.values()) == len(records)
            assert all("\n" not in why for why in dropped)
            for r in train + val + text:
                llava.turns_of(r)


@given(st.lists(st.one_of(ANY_TEXT, st.sampled_from(["/", ".", "", "coco/", "a/../b.jpg", "\\x.jpg"])), max_size=5)
       .map("/".join))
@SETTINGS
def test_llava_image_paths_generated(name):
    from vlmpipe.data import llava

    source, iid = llava.image_source(name), llava.image_id(name)
    assert isinstance(source, str) and (iid is None or (source == "coco" and iid >= 0))


# ------------------------------------------------------------------ images

@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_images_mutated_bytewise(tmp_path, fmt):
    from PIL import Image

    from vlmpipe.face.images import read_image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(buf, format=fmt)
    for i, m in enumerate(mutations(buf.getvalue(), EXAMPLES, seed=4)):
        f = tmp_path / f"img{i}.{fmt.lower()}"
        f.write_bytes(m)
        try:
            img = read_image(f)
            assert img.mode == "RGB"
        except UserError as e:
            one_line(e, str(f))
    with pytest.raises(UserError) as e:
        read_image(tmp_path)
    assert one_line(e) == f"{tmp_path}: a folder, not an image file"


def test_a_damaged_batch_in_a_cifar_archive_names_the_archive_and_the_member(tmp_path, tiny_cifar):
    """The stage extracts the tarball into its scratch folder, gone by the time the user reads the line:
    the line names the user's archive and the member inside it."""
    from vlmpipe.sources import cifar as cifar_source
    from vlmpipe.sources.params import CifarParams

    tarball = tmp_path / "mine" / "cifar-10-python.tar.gz"
    tarball.parent.mkdir()
    with tarfile.open(tarball, "w:gz") as tf:
        for f in sorted((tiny_cifar / "cifar-10-batches-py").iterdir()):
            data = f.read_bytes()[:200] if f.name == "data_batch_2" else f.read_bytes()
            info = tarfile.TarInfo(f"cifar-10-batches-py/{f.name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    scratch = tmp_path / "data" / ".cifar.k2j4x9.tmp" / "cifar"  # as the stage's atomic output folder
    with pytest.raises(UserError) as e:
        cifar_source.build(CifarParams(source="cifar10", local_path=str(tarball), verify=False), 0, scratch)
    assert one_line(e).startswith(f"{tarball}: member cifar-10-batches-py/data_batch_2: corrupt or truncated"), \
        str(e.value)


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A 128×96 JPEG whose frame header says ``width``×``height``: Pillow decodes it without an error,
    the missing pixels grey."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_a_jpeg_whose_header_claims_more_than_its_data_is_refused_everywhere(tmp_path, tiny_coco):
    """A JPEG whose header claims 6000×6000 but holds 128×96 of data used to be decoded with grey fill and
    captioned without a word. The CLI's file, the demo's upload, the pyfunc's row and a COCO member in the
    data stages all refuse it in one line naming it; a complete large flat JPEG still reads."""
    import base64
    import shutil
    import zipfile

    from mlflow.exceptions import MlflowException
    from PIL import Image

    from vlmpipe.data.coco import CocoCaptions
    from vlmpipe.face import limits
    from vlmpipe.face.images import read_image
    from vlmpipe.face.pyfunc_model import read_images

    data = _jpeg_claiming(6000, 6000)
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # Pillow alone: no error
        assert im.size == (6000, 6000)
    f = tmp_path / "photo.jpg"
    f.write_bytes(data)
    want = "truncated JPEG (its header says 6000×6000 pixels"
    for call, name in ((lambda: read_image(f), str(f)), (lambda: limits.decode_image(data), "the upload")):
        with pytest.raises(UserError) as e:
            call()
        assert one_line(e.value, name).startswith(f"{name}: {want}"), str(e.value)
    with pytest.raises(MlflowException) as e:  # the pyfunc's way to say "bad input" (HTTP 400 when served)
        read_images([base64.b64encode(data).decode()])
    assert e.value.message.startswith(f"image in row 0: {want}"), e.value.message

    root = tmp_path / "coco"
    shutil.copytree(tiny_coco, root)
    val = CocoCaptions(root, "val")
    member = val.member(val.ids[0])
    with zipfile.ZipFile(tiny_coco / "val2017.zip") as zin, zipfile.ZipFile(root / "val2017.zip", "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, data if info.filename == member else zin.read(info))
    with pytest.raises(UserError) as e:
        CocoCaptions(root, "val").image(val.ids[0])
    assert one_line(e.value).startswith(f"{root / 'val2017.zip'}: member {member}: {want}"), str(e.value)

    flat = io.BytesIO()
    Image.new("RGB", (2000, 1500), (128, 128, 128)).save(flat, "JPEG", progressive=True, optimize=True, quality=1)
    (tmp_path / "flat.jpg").write_bytes(flat.getvalue())
    assert read_image(tmp_path / "flat.jpg").size == (2000, 1500)


# ------------------------------------------------------------------ misbehaving servers

@pytest.mark.parametrize("mode", ["truncate_always", "wrong_range", "ignore_range", "status_500", "status_404",
                                  "short_length"])
def test_misbehaving_servers_never_leave_a_wrong_file(tmp_path, file_server, mode, monkeypatch):
    import hashlib

    from vlmpipe.core.download import download

    monkeypatch.setattr("vlmpipe.core.download.time.sleep", lambda s: None)
    payload = np.random.default_rng(1).bytes(300_000)
    path = "/f.bin"
    file_server.files[path] = payload
    dest = tmp_path / "f.bin"
    file_server.drop_always.add(path)  # a partial (and its record) from an earlier, interrupted run
    with pytest.raises(UserError):
        download(file_server.url(path), dest, retries=0, backoff=0)
    file_server.drop_always.discard(path)
    if mode == "truncate_always":
        file_server.drop_always.add(path)
    elif mode == "wrong_range":
        file_server.wrong_range.add(path)
    elif mode == "ignore_range":
        file_server.ignore_range.add(path)
    elif mode == "status_404":
        file_server.files.pop(path)
    elif mode == "status_500":
        file_server.status[path] = 500
    elif mode == "short_length":
        file_server.files[path] = payload[:-100]
    try:
        download(file_server.url(path), dest, md5=hashlib.md5(payload).hexdigest(), retries=2, backoff=0)
    except UserError as e:
        one_line(e, "f.bin")
        assert not dest.exists()
        return
    assert dest.read_bytes() == payload


# ------------------------------------------------------------------ model folders and checkpoints

@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A tiny captioner and a SigLIP, saved as the stages save them."""
    import torch

    from vlmpipe.models import captioner as C
    from vlmpipe.models.siglip.model import build_siglip
    from vlmpipe.loop.tiny_base import build as build_tiny_base
    from vlmpipe.siglip.params import SiglipParams
    from vlmpipe.core.params import TinyLMParams

    root = tmp_path_factory.mktemp("models")
    lm = build_tiny_base("gpt2", TinyLMParams(vocab_size=512, hidden_size=32, layers=1, heads=2, warmup_steps=0),
                       ["a red circle", "a blue star"] * 4, root / "lm", seed=0)
    tower = build_siglip(SiglipParams(text_width=32, text_layers=1), ["a photo of a circle", "a photo of a star"])
    tower.eval()
    tower.save(root / "siglip")
    from vlmpipe.data.features import siglip_identity

    ident = {**siglip_identity(root / "siglip"), "path": "../siglip"}
    cap = C.build_captioner(lm, encoder=ident, feature_dim=512, regions=1, prefix_tokens=2, freeze_lm=False,
                            beam_size=2, max_caption_tokens=6)
    torch.manual_seed(0)
    cap.save(root / "captioner")
    return root


def _corruptions(f: Path) -> list[tuple[str, bytes | None]]:
    data = f.read_bytes()
    return [("truncated", data[: len(data) // 2]), ("empty", b""), ("garbage", b"\x00\xffnot this" * 7),
            ("flipped", bytes(b ^ 0x5A if i % 97 == 0 else b for i, b in enumerate(data))), ("deleted", None)]


@pytest.mark.parametrize("which", ["captioner", "siglip"])
def test_damaged_model_folders_give_one_line(saved_models, tmp_path, which):
    """Each file of a saved model, damaged in five ways: the loader works or names the file."""
    import shutil

    from vlmpipe.models.captioner import load_captioner
    from vlmpipe.models.siglip.model import load_siglip

    load = {"captioner": load_captioner, "siglip": load_siglip}[which]
    files = sorted(p.relative_to(saved_models / which) for p in (saved_models / which).rglob("*") if p.is_file())
    assert files
    n = 0
    for rel in files:
        for how, content in _corruptions(saved_models / which / rel):
            d = tmp_path / f"{n}" / which
            n += 1
            shutil.copytree(saved_models / which, d)
            if content is None:
                (d / rel).unlink()
            else:
                (d / rel).write_bytes(content)
            try:
                load(d)
            except UserError as e:
                one_line(e, str(d))
    assert n == 5 * len(files)


def test_cli_on_a_damaged_captioner_is_one_line(saved_models, tmp_path):
    import shutil
    import subprocess
    import sys

    from PIL import Image

    d = tmp_path / "captioner"
    shutil.copytree(saved_models / "captioner", d)
    shutil.copytree(saved_models / "siglip", tmp_path / "siglip")
    (d / "model.json").write_text("{not json")
    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(img)
    r = subprocess.run([sys.executable, "-m", "vlmpipe", "caption", str(img), "--model", str(d)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [x for x in r.stderr.splitlines() if x.startswith("error:")] == [
        f"error: {d / 'model.json'}: corrupt JSON (Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1)); run `dvc repro train_gpt2_captioner` (or `dvc checkout models/captioner`)"]


@pytest.mark.parametrize("target", ["identity.json", "trainable.safetensors", "state.pt"])
def test_a_damaged_checkpoint_is_set_aside_and_training_starts_fresh(tmp_path, target, caplog):
    """It used to give a traceback on every rerun, with nothing saying what to delete."""
    import torch

    from _toy_train import make_cfg, make_task
    from vlmpipe.loop.train import fit

    cfg = make_cfg(epochs=2, checkpoint_every=2)

    def run(ckpt):
        task = make_task()
        fit(task, cfg, seed=0, ckpt_dir=ckpt, report_dir=tmp_path / "r", identity={"t": 1})
        return {k: v.clone() for k, v in task.model.state_dict().items()}

    fresh = run(tmp_path / "fresh")
    ckpt = tmp_path / "ckpt"
    run(ckpt)
    latest = sorted(ckpt.glob("step_*"))[-1]
    f = latest / target
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    again = run(ckpt)
    assert all(torch.equal(fresh[k], again[k]) for k in fresh)  # started fresh, trained the same
    assert (ckpt / f"damaged-{latest.name}").is_dir()
    assert f"checkpoint {latest} cannot be resumed ({target}" in caplog.text and "starting fresh" in caplog.text


def test_a_checkpoint_of_another_model_shape_is_deleted_not_set_aside(tmp_path, caplog):
    """Other settings or code that shape the model otherwise (a projector per region, a BatchNorm more)
    make an old checkpoint another run's, not a damaged one: it is deleted with the keys that changed,
    and nothing stale is left in the checkpoint folder (which DVC caches)."""
    from _toy_train import make_cfg, make_task
    from vlmpipe.loop.train import fit

    cfg, ckpt = make_cfg(epochs=1, checkpoint_every=2), tmp_path / "ckpt"
    fit(make_task(bn=False), cfg, seed=0, ckpt_dir=ckpt, report_dir=tmp_path / "r", identity={"bn": False})
    old = sorted(ckpt.glob("step_*"))[-1]
    fit(make_task(bn=True), cfg, seed=0, ckpt_dir=ckpt, report_dir=tmp_path / "r", identity={"bn": True})
    assert f"checkpoint {old} was made with different settings (bn: False -> True" in caplog.text
    assert "cannot be resumed" not in caplog.text and not list(ckpt.glob("damaged-*"))
    assert [p.name for p in ckpt.glob("step_*")] == [old.name]  # the new run's own last checkpoint


# ------------------------------------------------------------------ arbitrary text through reports and the CLI

@SETTINGS
@given(st.lists(ANY_TEXT, min_size=3, max_size=3))
def test_arbitrary_text_in_the_gallery_and_plots(tmp_path_factory, texts):
    from PIL import Image

    from vlmpipe.evaluate import report
    from vlmpipe.scoring.metrics import normalize_answer

    out = tmp_path_factory.mktemp("g")
    img = Image.new("RGB", (16, 16), (200, 0, 0))
    caps = [report.CaptionExample(img, texts[0], [texts[1]])]
    qa = [report.QAExample(img, texts[2], [(texts[0], texts[1], texts[2])])]
    report.gallery_png(caps, qa, out / "g.png")
    html = report.gallery_html(caps, qa, {}, out / "g.html").read_text()
    assert "<script>" not in html.replace("<script>alert", "")  # escaped: only our own markup
    assert Image.open(out / "g.png").size[0] > 100
    normalize_answer(texts[0])


def test_empty_question_is_refused(capsys):
    from vlmpipe.__main__ import main

    assert main(["ask", str(ROOT / "README.md"), "   "]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: question: empty (ask something about the image)"


@SETTINGS
@given(st.lists(st.one_of(ANY_TEXT, st.sampled_from(["caption", "ask", "--model", "--beam-size", "-1", "0",
                                                     "--history", "x.png", "--help"])), max_size=5))
def test_cli_arguments_generated(argv):
    """Whatever the arguments: exit 0 or 2 (argparse's usage error or one `error:` line), never a traceback."""
    import contextlib

    from vlmpipe.__main__ import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse: --help (0) or a usage error (2)
            code = e.code
    assert code in (0, 2), (argv, err.getvalue())
    assert "Traceback" not in err.getvalue()


# ------------------------------------------------------------------ smaller defects

def test_cuda_without_a_gpu_names_the_whole_key():
    import torch

    from vlmpipe.core.runtime import resolve_device

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError) as e:
        resolve_device("cuda", "phi2.train.device")
    assert one_line(e).startswith("phi2.train.device: 'cuda' requested but no CUDA device is available")


def test_a_killed_runs_scratch_folder_is_removed_by_the_next_run(tmp_path):
    """The tiny base is built in a scratch folder inside the stage's checkpoint folder: after a
    SIGKILL (no cleanup runs) the next run removes it, instead of it piling up in $TMPDIR."""
    import os

    from vlmpipe.core.io import scratch_dir

    dead = tmp_path / ".tiny-base-99999999.tmp"  # no such process
    alive = tmp_path / ".tiny-base-1.tmp"  # pid 1 exists: another live run's folder stays
    dead.mkdir()
    alive.mkdir()
    with scratch_dir(tmp_path, "tiny-base") as d:
        assert d == tmp_path / f".tiny-base-{os.getpid()}.tmp" and d.is_dir()
        assert not dead.exists() and alive.exists()
    assert not d.exists()


def test_dvc_analytics_are_off_in_the_repository_config():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / ".dvc/config")
    assert cfg.get("core", "analytics") == "false"
