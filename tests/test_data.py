"""Generated data, the real-format readers, and the Q/A CSV.

Ground truth is recomputed here independently of the library: from the facts
table read directly, from the generation record in the synthetic file names,
and from the pixels with a simpler method than the library's.
"""
from __future__ import annotations

import csv
from collections import defaultdict
import hashlib
import io
import json
import multiprocessing
import pickle
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from vlmpipe.data import cifar, coco, qa
from vlmpipe.sources import cifar as cifar_source, coco as coco_source, qa as qa_source, shapes
from vlmpipe.core.errors import UserError
from vlmpipe.sources.params import CocoParams

FACTS = json.loads((Path(qa_source.__file__).parent / "facts.json").read_text())
PALETTE = {n: np.array(c, dtype=float) for n, c in shapes.COLOURS.items()}


def _nearest(rgb) -> str:
    return min(PALETTE, key=lambda n: np.linalg.norm(PALETTE[n] - rgb))


def _truth_colour(img: np.ndarray) -> str:
    """Independent check: background from the four corners, object = mean of far pixels."""
    img = img.astype(float)
    corners = np.concatenate([img[:2, :2], img[:2, -2:], img[-2:, :2], img[-2:, -2:]]).reshape(-1, 3)
    far = np.abs(img - np.median(corners, axis=0)).sum(-1) > 100
    return _nearest(img[far].mean(axis=0))


def _truth_brightness(img: np.ndarray) -> str:
    return "light" if img[[0, -1]].mean() > 120 else "dark"


# --- shapes world ----------------------------------------------------------------


def test_class_images_show_their_shape_colour_and_background():
    rng = np.random.default_rng(1)
    for kind in shapes.SHAPES:
        for _ in range(10):
            img, sh, bg = shapes.shape_image(rng, kind)
            assert img.shape == (32, 32, 3) and img.dtype == np.uint8
            assert sh.kind == kind
            assert _truth_colour(img) == sh.colour
            assert _truth_brightness(img) == bg


def test_scenes_keep_each_shape_in_its_quadrant_and_captions_are_true():
    rng = np.random.default_rng(2)
    pos_words = "|".join(shapes.QUADRANT_NAMES)
    desc = r"an? (small|large) (\w+) (\w+)"
    rel_re = re.compile(rf"{desc} (above and to the left of|above and to the right of|below and to the left of|"
                        rf"below and to the right of|to the left of|to the right of|above|below) {desc}")
    where_re = re.compile(rf"{desc} in the ({pos_words})")
    counts = set()
    for _ in range(150):
        scene = shapes.random_scene(rng, 64)
        counts.add(len(scene.shapes))
        assert len({s.quadrant for s in scene.shapes}) == len(scene.shapes)
        by_desc = {(s.size, s.colour, s.kind): s for s in scene.shapes}
        assert len(by_desc) == len(scene.shapes)
        for s in scene.shapes:
            # Mostly inside its own 32x32 quadrant, and the quadrant crop alone
            # shows its colour (what the captioner's quadrant features see).
            m = shapes.shape_mask(s, 64, 64)
            col, row = shapes.QUADRANTS[s.quadrant]
            assert m[row * 32:(row + 1) * 32, col * 32:(col + 1) * 32].sum() >= 0.95 * m.sum()
            crop = scene.image[row * 32:(row + 1) * 32, col * 32:(col + 1) * 32]
            assert _truth_colour(crop) == s.colour
        caps = shapes.scene_captions(scene, rng, 5)
        assert len(set(caps)) == 5
        for c in caps:
            for s in scene.shapes:
                if len(scene.shapes) > 1 or "coloured" not in c:
                    assert f"{s.size} {s.colour} {s.kind}" in c, c
            for m in rel_re.finditer(c):
                a, b = by_desc[m.group(1, 2, 3)], by_desc[m.group(5, 6, 7)]
                rel = m.group(4)
                # Check against the drawn geometry (centres are >= 20 px apart per axis).
                if "left" in rel:
                    assert a.cx < b.cx - 20, c
                if "right" in rel:
                    assert a.cx > b.cx + 20, c
                if "above" in rel:
                    assert a.cy < b.cy - 20, c
                if "below" in rel:
                    assert a.cy > b.cy + 20, c
                if rel in ("to the left of", "to the right of"):
                    assert abs(a.cy - b.cy) < 12, c
                if rel in ("above", "below"):
                    assert abs(a.cx - b.cx) < 12, c
            for m in where_re.finditer(c):
                s = by_desc[m.group(1, 2, 3)]
                vert, horiz = m.group(4).split()
                assert (s.cy < 32) == (vert == "top") and (s.cx < 32) == (horiz == "left"), c
            if "background" in c:
                assert f"{scene.background} background" in c
                assert _truth_brightness(scene.image) == scene.background
    assert counts == {1, 2, 3}


# --- CIFAR -----------------------------------------------------------------------


def test_cifar_batches_have_the_official_layout(tiny_cifar):
    bdir = tiny_cifar / "cifar-10-batches-py"
    assert sorted(p.name for p in bdir.iterdir()) == sorted([*cifar.TRAIN_BATCHES, "test_batch", "batches.meta"])
    # The loader from the CIFAR-10 web page, verbatim in spirit.
    with open(bdir / "data_batch_1", "rb") as f:
        d = pickle.load(f, encoding="bytes")
    assert set(d) == {b"data", b"labels", b"filenames", b"batch_label"}
    assert d[b"data"].dtype == np.uint8 and d[b"data"].shape == (40, 3072)
    with open(bdir / "batches.meta", "rb") as f:
        assert pickle.load(f, encoding="bytes")[b"label_names"] == [n.encode() for n in shapes.SHAPES]

    train = cifar.load_split(tiny_cifar, "train")
    test = cifar.load_split(tiny_cifar, "test")
    assert train.images.shape == (200, 32, 32, 3) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64 and np.bincount(train.labels).tolist() == [20] * 10
    assert len(test) == 50 and np.bincount(test.labels).tolist() == [5] * 10
    assert train.label_names == list(shapes.SHAPES)
    # Channel-planar rows: the first 1024 values are the red plane, row by row.
    row, img = d[b"data"][3], train.images[3]
    assert (row[:1024] == img[:, :, 0].ravel()).all() and (row[2048:] == img[:, :, 2].ravel()).all()
    assert d[b"labels"][3] == train.labels[3]
    for img, label, name in zip(train.images, train.labels, train.filenames):
        assert name.split("_")[2] == train.label_names[label]
        assert _truth_colour(img) == name.split("_")[0]


def test_cifar_reader_accepts_protocol2_pickles(tmp_path, tiny_cifar):
    bdir = tmp_path / "cifar-10-batches-py"
    bdir.mkdir()
    for f in (tiny_cifar / "cifar-10-batches-py").iterdir():
        with open(f, "rb") as src:
            obj = pickle.load(src, encoding="bytes")
        with open(bdir / f.name, "wb") as dst:
            pickle.dump(obj, dst, protocol=2)  # bytes go through _codecs.encode
    a, b = cifar.load_split(tmp_path, "test"), cifar.load_split(tiny_cifar, "test")
    assert (a.images == b.images).all() and (a.labels == b.labels).all()


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch pwned",))


def test_cifar_reader_refuses_pickled_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bdir = tmp_path / "cifar-10-batches-py"
    bdir.mkdir()
    (bdir / "batches.meta").write_bytes(pickle.dumps({b"label_names": _Evil()}))
    with pytest.raises(UserError, match=r"batches\.meta: refusing to load a pickle that references posix\.system"):
        cifar.load_split(tmp_path, "test")
    assert not (tmp_path / "pwned").exists()


def test_cifar_truncated_or_wrong_batch(tmp_path, tiny_cifar):
    bdir = tmp_path / "cifar-10-batches-py"
    bdir.mkdir()
    for f in (tiny_cifar / "cifar-10-batches-py").iterdir():
        (bdir / f.name).write_bytes(f.read_bytes())
    full = (bdir / "test_batch").read_bytes()
    (bdir / "test_batch").write_bytes(full[: len(full) // 2])
    with pytest.raises(UserError, match=r"test_batch: corrupt or truncated CIFAR batch") as e:
        cifar.load_split(tmp_path, "test")
    assert str(bdir / "test_batch") in str(e.value)
    (bdir / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}))
    with pytest.raises(UserError, match=r"test_batch: 'data' must be an N×3072 uint8 array"):
        cifar.load_split(tmp_path, "test")
    (bdir / "data_batch_3").unlink()
    with pytest.raises(UserError, match=r"data_batch_3: CIFAR batch not found"):
        cifar.load_split(tmp_path, "train")


def test_cifar_official_ingest_from_loopback(tmp_path, tiny_cifar, file_server):
    """The full-preset path: md5-verified tarball over HTTP (with a dropped connection), safely extracted."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(tiny_cifar / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    data = buf.getvalue()
    file_server.files["/cifar-10-python.tar.gz"] = data
    file_server.drop_once.add("/cifar-10-python.tar.gz")
    root = tmp_path / "cifar"
    cifar_source.ingest_official(root, tmp_path / "dl", url=file_server.url("/cifar-10-python.tar.gz"),
                          md5=hashlib.md5(data).hexdigest(), size=len(data))
    got, want = cifar.load_split(root, "train"), cifar.load_split(tiny_cifar, "train")
    assert (got.images == want.images).all() and got.label_names == want.label_names
    assert [s for _, _, s in file_server.log] == [200, 206]


def test_cifar_from_params_mirror_local_copy_and_their_mistakes(tmp_path, tiny_cifar, file_server):
    from vlmpipe.sources.params import CifarParams

    tarball = tmp_path / "mine" / "cifar-10-python.tar.gz"
    tarball.parent.mkdir()
    with tarfile.open(tarball, "w:gz") as tf:
        tf.add(tiny_cifar / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    data = tarball.read_bytes()
    file_server.files["/m/cifar-10-python.tar.gz"] = data
    url = file_server.url("/m/cifar-10-python.tar.gz")
    cifar_source.build(CifarParams(source="cifar10", url=url, verify=False), 0, tmp_path / "a", download_dir=tmp_path / "dl")
    cifar_source.build(CifarParams(source="cifar10", local_path=str(tarball), verify=False), 0, tmp_path / "b")
    assert len(file_server.log) == 1 and tarball.read_bytes() == data
    with pytest.raises(UserError, match=r"^cifar\.url: .*size mismatch \(expected 170498071 bytes"):
        cifar_source.build(CifarParams(source="cifar10", url=url), 0, tmp_path / "c", download_dir=tmp_path / "dl2")
    with pytest.raises(UserError, match=re.escape(str(tarball)) + r": size mismatch .*cifar\.verify: false"):
        cifar_source.build(CifarParams(source="cifar10", local_path=str(tarball)), 0, tmp_path / "d")
    assert tarball.read_bytes() == data  # the user's file is never deleted


def test_a_downloaded_file_that_is_not_the_archive_names_itself_for_deletion(tmp_path, tiny_cifar, file_server):
    """A mirror (cifar.verify: false, so no checksum) served another archive: the download is complete by
    every check it had, is kept, and every rerun fails the same way. The line says which file to delete;
    deleted, the next run downloads it again."""
    from vlmpipe.sources.params import CifarParams

    wrong = io.BytesIO()
    with tarfile.open(fileobj=wrong, mode="w:gz") as tf:
        tf.add(tiny_cifar / "cifar-10-batches-py" / "data_batch_1", arcname="cifar-10-batches-py/data_batch_1")
    right = io.BytesIO()
    with tarfile.open(fileobj=right, mode="w:gz") as tf:
        tf.add(tiny_cifar / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    file_server.files["/m/cifar-10-python.tar.gz"] = wrong.getvalue()
    params = CifarParams(source="cifar10", url=file_server.url("/m/cifar-10-python.tar.gz"), verify=False)
    kept = tmp_path / "dl" / "cifar-10-python.tar.gz"
    for _ in range(2):
        with pytest.raises(UserError) as e:
            cifar_source.build(params, 0, tmp_path / "a", download_dir=tmp_path / "dl")
        assert str(e.value).endswith(f"; delete {kept} to download it again"), str(e.value)
        assert "not a CIFAR-10 python archive" in str(e.value) and "\n" not in str(e.value)
    file_server.files["/m/cifar-10-python.tar.gz"] = right.getvalue()
    kept.unlink()
    cifar_source.build(params, 0, tmp_path / "b", download_dir=tmp_path / "dl")
    assert (tmp_path / "b" / "cifar-10-batches-py" / "test_batch").exists()


# --- COCO ------------------------------------------------------------------------


def test_coco_folder_is_official_format(tiny_coco):
    assert sorted(p.name for p in tiny_coco.iterdir()) == ["annotations", "train2017.zip", "val2017.zip"]
    for split, n in (("train", 12), ("val", 6)):
        data = json.loads((tiny_coco / f"annotations/captions_{split}2017.json").read_text())
        assert set(data) == {"info", "licenses", "images", "annotations"}
        assert set(data["images"][0]) == {"license", "file_name", "coco_url", "height", "width", "date_captured", "flickr_url", "id"}
        assert set(data["annotations"][0]) == {"image_id", "id", "caption"}
        assert len(data["images"]) == n and len(data["annotations"]) == 5 * n
        with zipfile.ZipFile(tiny_coco / f"{split}2017.zip") as zf:
            names = zf.namelist()
        assert len(names) == n and all(re.fullmatch(rf"{split}2017/\d{{12}}\.jpg", m) for m in names)


def test_synthetic_coco_states_each_scenes_facts_beside_its_captions(tiny_coco):
    """annotations/scenes_{split}2017.json: the world's words and, per image, what its captions describe."""
    assert sorted(p.name for p in (tiny_coco / "annotations").iterdir()) == [
        "captions_train2017.json", "captions_val2017.json", "scenes_train2017.json", "scenes_val2017.json"]
    for split in ("train", "val"):
        facts = json.loads((tiny_coco / f"annotations/scenes_{split}2017.json").read_text())
        words = facts["vocabulary"]
        assert (words["kinds"], words["colours"], words["sizes"], words["backgrounds"]) == (
            list(shapes.SHAPES), list(shapes.COLOURS), list(shapes.SIZES), list(shapes.BACKGROUNDS))
        assert [(q["name"], (q["column"], q["row"])) for q in words["quadrants"]] == list(
            zip(shapes.QUADRANT_NAMES, shapes.QUADRANTS))
        data = json.loads((tiny_coco / f"annotations/captions_{split}2017.json").read_text())
        assert [s["image_id"] for s in facts["scenes"]] == [im["id"] for im in data["images"]]
        captions = defaultdict(list)
        for a in data["annotations"]:
            captions[a["image_id"]].append(a["caption"])
        for scene in facts["scenes"]:
            caps = captions[scene["image_id"]]
            assert scene["background"] in words["backgrounds"] and 1 <= len(scene["shapes"]) <= 3
            assert len({s["quadrant"] for s in scene["shapes"]}) == len(scene["shapes"])
            # Every shape is in some caption with its size, colour and kind; no caption names another kind.
            for s in scene["shapes"]:
                assert any(f"{s['size']} {s['colour']} {s['kind']}" in c
                           or f"{s['size']} {s['kind']} coloured {s['colour']}" in c for c in caps), (s, caps)
                placed = [c for c in caps if re.search(rf"{s['kind']} in the (top|bottom) (left|right)", c)]
                assert all(f"{s['kind']} in the {s['quadrant']}" in c for c in placed), (s, placed)
            named = {k for c in caps for k in words["kinds"] if re.search(rf"\b{k}\b", c)}
            assert named == {s["kind"] for s in scene["shapes"]}, (scene, caps)
            said = {b for c in caps for b in words["backgrounds"] if f"{b} background" in c}
            assert said <= {scene["background"]}, (scene, caps)


def test_coco_reader(tiny_coco):
    ds = coco.CocoCaptions(tiny_coco, "train")
    assert len(ds) == 12 and ds.ids == sorted(ds.ids) and all(isinstance(i, int) for i in ds.ids)
    val = coco.CocoCaptions(tiny_coco, "val")
    assert not set(ds.ids) & set(val.ids)
    for i in ds.ids:
        img = ds.image(i)
        assert img.mode == "RGB" and img.size == (64, 64)
        caps = ds.captions(i)
        assert len(caps) == 5 and len(set(caps)) == 5
        # Every caption names a colour that is really in the picture (JPEG round trip included).
        px = np.asarray(img)
        for c in caps:
            for colour in shapes.COLOURS:
                if re.search(rf"\b{colour}\b", c):
                    near = np.linalg.norm(px.reshape(-1, 3).astype(float) - PALETTE[colour], axis=1) < 50
                    assert near.sum() >= 15, (c, colour)


def _image_sizes(ds, ids):
    return [ds.image(i).size for i in ids]


def test_coco_reader_survives_pickle_and_fork(tiny_coco):
    ds = coco.CocoCaptions(tiny_coco, "val")
    ds.image(ds.ids[0])  # opens the archive in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._zip is None and np.array_equal(np.asarray(clone.image(ds.ids[1])), np.asarray(ds.image(ds.ids[1])))
    with multiprocessing.get_context("fork").Pool(2) as pool:
        sizes = pool.starmap(_image_sizes, [(ds, ds.ids[:3]), (ds, ds.ids[3:])])
    assert sum(sizes, []) == [(64, 64)] * 6


def test_coco_generation_is_deterministic_and_subset_reuses_the_same_images(tmp_path, tiny_coco):
    again = tmp_path / "again"
    coco_source.build(CocoParams(synthetic_train_images=12, synthetic_val_images=6, image_size=64), 0, again)
    for rel in ("train2017.zip", "val2017.zip", "annotations/captions_train2017.json",
                "annotations/scenes_train2017.json"):
        assert (again / rel).read_bytes() == (tiny_coco / rel).read_bytes(), rel

    sub = tmp_path / "sub"
    coco_source.build(CocoParams(synthetic_train_images=12, synthetic_val_images=6, image_size=64, max_images=5), 0, sub)
    full, part = coco.CocoCaptions(tiny_coco, "train"), coco.CocoCaptions(sub, "train")
    assert len(part) == 5 and set(part.ids) <= set(full.ids)
    for i in part.ids:
        assert part.captions(i) == full.captions(i)
        assert np.array_equal(np.asarray(part.image(i)), np.asarray(full.image(i)))
    # The subset's facts are the full set's, for the images kept.
    facts = {split: [json.loads((root / f"annotations/scenes_{split}2017.json").read_text()) for root in (tiny_coco, sub)]
             for split in ("train", "val")}
    for split, (whole, kept) in facts.items():
        ids = coco.CocoCaptions(sub, split).ids
        assert len(ids) == 5 and kept["vocabulary"] == whole["vocabulary"]
        assert kept["scenes"] == [s for s in whole["scenes"] if s["image_id"] in set(ids)]
    sub2 = tmp_path / "sub2"
    coco_source.build(CocoParams(synthetic_train_images=12, synthetic_val_images=6, image_size=64, max_images=5), 0, sub2)
    assert (sub2 / "train2017.zip").read_bytes() == (sub / "train2017.zip").read_bytes()


def test_coco_corrupt_image_names_archive_and_member(tmp_path, tiny_coco):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for rel in ("annotations/captions_val2017.json", "train2017.zip"):
        (root / rel).write_bytes((tiny_coco / rel).read_bytes())
    with zipfile.ZipFile(tiny_coco / "val2017.zip") as src, zipfile.ZipFile(root / "val2017.zip", "w") as dst:
        names = src.namelist()
        for n in names:
            data = src.read(n)
            dst.writestr(n, data[: len(data) // 3] if n == names[0] else data)
    ds = coco.CocoCaptions(root, "val")
    bad = next(i for i in ds.ids if ds.member(i) == names[0])
    with pytest.raises(UserError) as e:
        ds.image(bad)
    assert str(root / "val2017.zip") in str(e.value) and names[0] in str(e.value) and "truncated" in str(e.value)
    ds.image(next(i for i in ds.ids if i != bad))  # the others still read
    with pytest.raises(UserError, match=r"captions_train2017\.json: not found"):
        coco.CocoCaptions(root, "train")


def test_coco_official_download_and_ingest_from_loopback(tmp_path, file_server):
    """The full-preset path: the three official files over HTTP, then a seeded subset."""
    src = tmp_path / "src"
    coco_source.write_synthetic_source(src, 10, 4, 64, seed=3)
    for name, (url, _, _) in coco_source.OFFICIAL.items():
        file_server.files[url.split("cocodataset.org", 1)[1]] = (src / name).read_bytes()
    file_server.drop_once.add("/zips/train2017.zip")
    ddir = coco_source.download_official(tmp_path / "dl", base_url=file_server.url(""), verify=False)
    out = tmp_path / "out"
    counts = coco_source.ingest(ddir, out, max_images=3, seed=0)
    assert counts == {"train": 3, "val": 3}
    ds = coco.CocoCaptions(out, "train")
    assert len(ds) == 3 and ds.image(ds.ids[0]).size == (64, 64)


def _served_coco(file_server, tmp_path):
    src = tmp_path / "src"
    coco_source.write_synthetic_source(src, 4, 2, 64, seed=3)
    for name, (url, _, _) in coco_source.OFFICIAL.items():
        file_server.files["/mirror" + url.split("cocodataset.org", 1)[1]] = (src / name).read_bytes()
    return src


def test_coco_from_params_mirror_local_copy_and_their_mistakes(tmp_path, file_server):
    """coco.url, coco.local_dir and coco.verify as a user sets them; every mistake is one line that
    names the param, and no file of the user's is touched."""
    from vlmpipe.sources.params import CocoParams

    src = _served_coco(file_server, tmp_path)
    before = {f.name: f.read_bytes() for f in src.iterdir()}
    mirror = file_server.url("/mirror")
    # A mirror serving other bytes than the published archives, as said with verify: false.
    assert coco_source.build(CocoParams(source="coco2017", url=mirror, verify=False), 0, tmp_path / "a",
                      download_dir=tmp_path / "dl") == {"train": 4, "val": 2}
    # Real COCO has no scene facts: none are written, even when the archives hold the shapes world.
    assert sorted(p.name for p in (tmp_path / "a/annotations").iterdir()) == [
        "captions_train2017.json", "captions_val2017.json"]
    # A folder the user filled: used in place, nothing downloaded, nothing changed. Its whole archives
    # are copied, never linked: the user's files keep their link count and mode, and a later append
    # to one (`curl -C -`) leaves the output, which DVC caches by linking, as it was.
    n = len(file_server.log)
    stats = {f.name: (f.stat().st_nlink, f.stat().st_mode) for f in src.iterdir()}
    assert coco_source.build(CocoParams(source="coco2017", local_dir=str(src), verify=False), 0, tmp_path / "b") == \
        {"train": 4, "val": 2}
    assert len(file_server.log) == n and {f.name: f.read_bytes() for f in src.iterdir()} == before
    assert {f.name: (f.stat().st_nlink, f.stat().st_mode) for f in src.iterdir()} == stats
    whole = [f for f in ("train2017.zip", "val2017.zip") if (tmp_path / "b" / f).read_bytes() == before[f]]
    assert whole, "no archive was kept whole: the copy-or-link path was not taken"
    out_bytes = {f: (tmp_path / "b" / f).read_bytes() for f in whole}
    for f in whole:
        with open(src / f, "ab") as fh:
            fh.write(b"appended later")
        assert (tmp_path / "b" / f).read_bytes() == out_bytes[f]
        (src / f).write_bytes(before[f])
    cases = [
        # the published md5/size checked against a mirror that serves other bytes
        (CocoParams(source="coco2017", url=mirror), r"^coco\.url: .*annotations_trainval2017\.zip: size mismatch "
                                                    r"\(expected 252907541 bytes, server announces \d+\) at http"),
        # a wrong mirror URL
        (CocoParams(source="coco2017", url=file_server.url("/nope"), verify=False),
         r"^coco\.url: http://127\.0\.0\.1:\d+/nope/annotations/annotations_trainval2017\.zip: HTTP 404"),
        # the user's copy is not the published one
        (CocoParams(source="coco2017", local_dir=str(src)), r"^" + re.escape(str(src / "annotations_trainval2017.zip"))
         + r": size mismatch .*set coco\.verify: false"),
        (CocoParams(source="coco2017", local_dir=str(tmp_path / "none")), r"^coco\.local_dir: .* is not a folder"),
    ]
    for params, pattern in cases:
        with pytest.raises(UserError) as e:
            coco_source.build(params, 0, tmp_path / "c", download_dir=tmp_path / "dl2")
        assert re.search(pattern, str(e.value)) and "\n" not in str(e.value), str(e.value)
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before
    assert not (tmp_path / "dl2").exists() or not list((tmp_path / "dl2").rglob("*.zip"))


# --- Q/A CSV ---------------------------------------------------------------------


def test_qa_csv_is_deterministic(qa_csv, tiny_cifar, tmp_path):
    again = tmp_path / "again.csv"
    qa_source.write_qa_csv(again, tiny_cifar, seed=7)
    assert again.read_bytes() == qa_csv.read_bytes()
    other = tmp_path / "other.csv"
    qa_source.write_qa_csv(other, tiny_cifar, seed=8)
    assert other.read_bytes() != qa_csv.read_bytes()


def test_every_answer_matches_its_ground_truth(qa_csv, tiny_cifar):
    section = FACTS["shapes"]
    fact_by_question = {q: (name, spec["answers"]) for name, spec in section["facts"].items() for q in spec["questions"]}
    with open(qa_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == qa.COLUMNS
    types_seen = set()
    for split in ("train", "test"):
        data = cifar.load_split(tiny_cifar, split)
        split_rows = [r for r in rows if r["Split"] == split]
        assert [int(r["Dataset_Index"]) for r in split_rows] == list(range(len(data)))
        for r in split_rows:
            i = int(r["Dataset_Index"])
            img, label = data.images[i], data.label_names[data.labels[i]]
            colour, _, kind, bg = data.filenames[i].split("_")[:4]  # how the image was drawn
            assert r["Class_Label"] == label == kind
            for k in range(1, 6):
                q, a, t = r[f"Q{k}"], r[f"A{k}"], r[f"T{k}"]
                types_seen.add(t)
                assert a == a.lower().strip() and 1 <= len(a.split()) <= 3
                if t == "class":
                    assert a == label
                elif t == "class_yesno":
                    named = [n for n in data.label_names if re.search(rf"\b{n}\b", q)]
                    assert len(named) == 1 and a == ("yes" if named[0] == label else "no"), q
                elif t == "colour":
                    assert a == colour == _truth_colour(img)
                elif t == "brightness":
                    assert a == bg == _truth_brightness(img)
                else:
                    name, answers = fact_by_question[q]
                    assert t == ("supercategory" if name == "supercategory" else f"fact_{name}")
                    assert a == answers[label]
    assert types_seen == {"class", "class_yesno", "colour", "brightness", "supercategory", "fact_sides", "fact_corners"}


def test_blind_baseline_is_beatable(tiny_cifar, tmp_path):
    from vlmpipe.scoring.metrics import BlindBaseline, vqa_accuracy

    df = qa_source.write_qa_csv(tmp_path / "qa.csv", tiny_cifar, seed=0)
    baseline = BlindBaseline((q, a, t) for _, _, q, a, t in qa.qa_pairs(df[df.Split == "train"]))
    blind = vqa_accuracy([(baseline(q, t), a, t) for _, _, q, a, t in qa.qa_pairs(df[df.Split == "test"])])["accuracy"]
    assert blind < 0.5
    # Yes/no class questions are balanced, so they carry no answer on their own.
    yesno = [a for _, _, _, a, t in qa.qa_pairs(df) if t == "class_yesno"]
    assert 0.35 < yesno.count("yes") / len(yesno) < 0.65


def test_prompts_and_texts(qa_csv, tiny_cifar):
    assert qa.class_prompts(["cat", "airplane"]) == ["a photo of a cat", "a photo of an airplane"]
    df = qa.read_qa_csv(qa_csv, tiny_cifar)
    texts = qa.csv_texts(df)
    assert len(texts) == 2 * 5 * len(df) and all(texts)
    assert texts[:2] == [df.Q1[0], df.A1[0]]


def test_cifar10_facts_cover_every_class():
    for section in FACTS.values():
        for spec in section["facts"].values():
            assert sorted(spec["answers"]) == sorted(section["classes"]) and len(spec["questions"]) >= 2
    assert FACTS["shapes"]["classes"] == list(shapes.SHAPES)
    cifar10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert qa_source.facts_section(cifar10) == FACTS["cifar10"]
    assert qa_source.facts_section(list(shapes.SHAPES)) == FACTS["shapes"]


# --- validation of user CSVs -----------------------------------------------------


def _edit(qa_csv: Path, tmp_path: Path, fn) -> Path:
    with open(qa_csv, newline="") as f:
        rows = list(csv.reader(f))
    fn(rows)
    out = tmp_path / "user.csv"
    with open(out, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    return out


def _set(col: str, value: str, row: int = 2):
    def fn(rows):
        rows[row][rows[0].index(col)] = value
    return fn


def _drop(col: str):
    def fn(rows):
        i = rows[0].index(col)
        for r in rows:
            del r[i]
    return fn


@pytest.mark.parametrize("edit, expected", [
    (_drop("A3"), r"line 1 \(header\): missing column A3"),
    (_drop("Q1"), r"line 1 \(header\): missing column Q1"),
    (_drop("Dataset_Index"), r"line 1 \(header\): missing column Dataset_Index"),
    (_set("Dataset_Index", "abc"), r"data row 2 \(line 3\), column Dataset_Index: 'abc' is not a non-negative integer"),
    (_set("Dataset_Index", "1.5"), r"data row 2 \(line 3\), column Dataset_Index: '1.5' is not"),
    (_set("Dataset_Index", "-1"), r"data row 2 \(line 3\), column Dataset_Index: '-1' is not"),
    (_set("Dataset_Index", "200"), r"data row 2 \(line 3\), column Dataset_Index: 200 is out of range \(the train split has 200 images"),
    (_set("A2", ""), r"data row 2 \(line 3\), column A2: empty answer to Q2"),
    (_set("A5", "   "), r"data row 2 \(line 3\), column A5: empty answer to Q5"),
    (_set("Split", "validation"), r"data row 2 \(line 3\), column Split: unknown split 'validation'"),
    (_set("Class_Label", "dog"), r"data row 2 \(line 3\), column Class_Label: 'dog' does not match train image 1"),
    (_set("Q4", "", row=5), r"data row 5 \(line 6\), column Q4: empty question for answer A4"),
])
def test_bad_csv_messages(qa_csv, tiny_cifar, tmp_path, edit, expected):
    path = _edit(qa_csv, tmp_path, edit)
    with pytest.raises(UserError) as e:
        qa.read_qa_csv(path, tiny_cifar)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    assert re.search(expected, msg), msg


def test_out_of_range_counts_the_row_split(qa_csv, tiny_cifar, tmp_path):
    def fn(rows):
        test_row = next(i for i, r in enumerate(rows) if r[2] == "test")
        rows[test_row][0] = "50"
    with pytest.raises(UserError, match=r"column Dataset_Index: 50 is out of range \(the test split has 50 images"):
        qa.read_qa_csv(_edit(qa_csv, tmp_path, fn), tiny_cifar)


def test_user_csv_without_split_and_types(qa_csv, tiny_cifar, tmp_path):
    def fn(rows):
        keep = [i for i, c in enumerate(rows[0]) if c != "Split" and not c.startswith("T")]
        rows[:] = [[r[i] for i in keep] for r in rows if r[2] in ("Split", "train")]
    df = qa.read_qa_csv(_edit(qa_csv, tmp_path, fn), tiny_cifar)
    assert list(df.columns) == qa.COLUMNS and len(df) == 200
    assert set(df.Split) == {"train"} and set(df.T1) == {"unknown"}
    assert df.Dataset_Index.dtype == np.int64


# --- the origin project's Q/A CSV, as its users have it ------------------------------

ORIGIN_HEADER = ["Image_Number", "Dataset_Index", "Class_Label", "Q1", "A1", "Q2", "A2", "Q3", "A3", "Q4", "A4",
                 "Q5", "A5", "Concat_Q", "Concat_A"]


def _origin_turns(i: int, label: str) -> list[tuple[str, str]]:
    """Five free-form questions and answers about image ``i`` of class ``label``, as a VLM wrote them."""
    return [("Is the image blurry?", "The image is blurry." if i % 3 == 0 else "No"),
            ("What is in the picture?", f"A {label} in the middle of the frame."),
            ("Décrivez la scène, s'il vous plaît.", f"Un {label} près de l'eau — très « joli » ({i}°)."),
            ('Is it "big"?', "Yes" if i % 2 else "No, it is rather small."),
            ("What colour dominates?", f"Mostly {('blue', 'grey', 'green', 'brown')[i % 4]}, with some white.")]


def _origin_csv(path: Path, labels, names, rows=None) -> Path:
    """The origin project's CSV about the images with ``labels`` (class ids into ``names``): interleaved
    Q/A columns, zero-padded Image_Number, Concat_* the five strings quoted and joined; ``rows``: which
    images (all by default)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)  # its own \r\n line ends, and quotes only where a field needs them
        w.writerow(ORIGIN_HEADER)
        for i in range(len(labels)) if rows is None else rows:
            turns = _origin_turns(i, names[labels[i]])
            w.writerow([f"{i:05d}", i, names[labels[i]], *[x for qa_ in turns for x in qa_],
                        ", ".join(f'"{q}"' for q, _ in turns), ", ".join(f'"{a}"' for _, a in turns)])
    return path


@pytest.fixture
def origin_repo(tmp_path, monkeypatch):
    """A working folder where build_cifar_qa_csv reads the official CIFAR-10 tarball (4 train and 2 test
    images per class) and the origin project's CSV about its test split; returns (folder, test labels,
    params)."""
    import yaml

    import standins

    repo = tmp_path / "repo"
    standins.cifar10_tarball(repo / "inputs/data", 4, 2, seed=0)
    _, labels, _ = cifar_source.synthetic_split(0, "test", 2)  # what the tarball's test batch holds
    _origin_csv(repo / "inputs/data/origin_qa.csv", labels, standins.CIFAR10_LABEL_NAMES)
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["cifar"].update(source="cifar10", local_path="inputs/data/cifar-10-python.tar.gz", verify=False)
    params["qa"].update(csv_path="inputs/data/origin_qa.csv")
    monkeypatch.chdir(repo)
    monkeypatch.setenv("VLMPIPE_TRACKING", "off")
    monkeypatch.delenv("VLMPIPE_PARAMS", raising=False)
    return repo, labels, params


def _build(params: dict) -> int:
    import yaml

    from stages import build_cifar_qa_csv

    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return build_cifar_qa_csv.main()


def test_origin_csv_is_accepted_unchanged_and_trains(origin_repo):
    """The origin project's CSV about CIFAR-10's test split, as it is: build_cifar_qa_csv finds the split
    from the labels, holds out a seeded tenth of its images, and the QA stage's loading finds training
    and held-out conversations with the features of the right images."""
    import torch

    import standins
    from vlmpipe.data import features
    from vlmpipe.qa.stage import qa_data

    repo, labels, params = origin_repo
    user_bytes = Path(params["qa"]["csv_path"]).read_bytes()
    assert _build(params) == 0
    assert Path(params["qa"]["csv_path"]).read_bytes() == user_bytes  # the user's file is untouched
    written = Path("data/cifar_qa.csv").read_bytes()
    with open("data/cifar_qa.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [*qa.COLUMNS, "Heldout"]
    names = standins.CIFAR10_LABEL_NAMES
    assert [(r["Dataset_Index"], r["Class_Label"], r["Split"]) for r in rows] == \
        [(str(i), names[lab], "test") for i, lab in enumerate(labels)]
    for i, r in enumerate(rows):  # every question and answer as the user wrote it, quotes and accents too
        assert [(r[f"Q{k}"], r[f"A{k}"]) for k in range(1, 6)] == _origin_turns(i, names[labels[i]])
        assert {r[f"T{k}"] for k in range(1, 6)} == {"unknown"}
    held = [int(r["Dataset_Index"]) for r in rows if r["Heldout"] == "yes"]
    assert len(held) == round(0.1 * len(labels)) and {r["Heldout"] for r in rows} == {"yes", "no"}

    # The same seed holds out the same images; another seed, others.
    assert _build(params) == 0 and Path("data/cifar_qa.csv").read_bytes() == written
    assert _build({**params, "seed": params["seed"] + 1}) == 0
    assert Path("data/cifar_qa.csv").read_bytes() != written
    assert _build(params) == 0

    # The QA stage's loading: cached features of both splits, each image's own value, so a row read from
    # the wrong split shows.
    enc = {"name": "test-encoder", "hash": "0"}
    for split, offset in (("train", 0), ("test", 1000)):
        n = len(cifar.load_split("data/cifar", split))
        features.save("data/embeddings", "cifar", split, list(range(n)),
                      torch.arange(offset, offset + n, dtype=torch.float32)[:, None, None], enc)
    df, (tr_convs, tr_types, tr_feats), (te_convs, te_types, te_feats) = qa_data(
        Path("data/cifar_qa.csv"), Path("data/cifar"), Path("data/embeddings"), enc)
    assert len(tr_convs) == len(labels) - len(held) and len(te_convs) == len(held)
    assert sorted(te_feats.flatten().long().tolist()) == [1000 + i for i in sorted(held)]
    assert sorted(tr_feats.flatten().long().tolist()) == [1000 + i for i in range(len(labels)) if i not in held]
    assert te_convs[0] == _origin_turns(held[0], names[labels[held[0]]])


def test_origin_csv_refusals_name_file_and_row(origin_repo, capsys):
    """A wrong qa.split and a label that fits no image: one `error:` line naming the file and the row,
    and no output changed."""
    import standins

    repo, labels, params = origin_repo
    assert _build(params) == 0
    before = {p: p.read_bytes() for p in Path("data").rglob("*") if p.is_file()}
    capsys.readouterr()
    src = params["qa"]["csv_path"]

    def error(p) -> str:
        assert _build(p) == 2
        lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
        assert len(lines) == 1, lines
        return lines[0]

    names = standins.CIFAR10_LABEL_NAMES
    train = cifar.load_split("data/cifar", "train").labels
    k = next(i for i, lab in enumerate(labels) if lab != train[i])  # the first row the train split contradicts
    assert error({**params, "qa": {**params["qa"], "split": "train"}}) == (
        f"error: {src}: data row {k + 1} (line {k + 2}), column Class_Label: {names[labels[k]]!r} does not match "
        f"train image {k}, which is {names[train[k]]!r} (no Split column; qa.split is 'train')")
    # One row's label changed: the rows before it match the test split, so that is what the line says.
    text = Path(src).read_text(encoding="utf-8").splitlines(keepends=True)
    wrong = next(n for n in names if n != names[labels[6]])
    text[7] = text[7].replace(f",{names[labels[6]]},", f",{wrong},", 1)
    Path(src).write_text("".join(text), encoding="utf-8")
    assert error(params) == (
        f"error: {src}: data row 7 (line 8), column Class_Label: {wrong!r} does not match test image 6, which is "
        f"{names[labels[6]]!r} (no Split column: rows 1-6 match the test split; qa.split names the split)")
    # The CSV about the test split with a Split column saying so, but qa.split says train.
    _origin_csv(Path(src), labels, names)
    rows = list(csv.reader(io.StringIO(Path(src).read_text(encoding="utf-8"))))
    with open(src, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([r + ["Split" if k == 0 else "test"] for k, r in enumerate(rows)])
    assert error({**params, "qa": {**params["qa"], "split": "train"}}) == (
        f"error: {src}: data row 1 (line 2), column Split: 'test', but qa.split is 'train'")
    assert {p: p.read_bytes() for p in Path("data").rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("field, value, words", [
    ("split", "val", "qa.split: must be 'auto', 'train' or 'test', got 'val'"),
    ("heldout_fraction", 0.0, "qa.heldout_fraction: must be in (0, 1)"),
    ("heldout_fraction", 1.0, "qa.heldout_fraction: must be in (0, 1)"),
])
def test_qa_split_params_are_validated(field, value, words):
    from vlmpipe.sources.params import QaParams

    QaParams().validate("qa")  # the defaults
    with pytest.raises(UserError) as e:
        QaParams(**{field: value}).validate("qa")
    assert str(e.value) == words


def test_a_one_split_csv_with_a_split_column_is_held_out_too(origin_repo):
    """The CSV with Split=test added (it used to pass this stage and be refused two stages later)."""
    repo, labels, params = origin_repo
    src = Path(params["qa"]["csv_path"])
    rows = list(csv.reader(io.StringIO(src.read_text(encoding="utf-8"))))
    with open(src, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([r + ["Split" if k == 0 else "test"] for k, r in enumerate(rows)])
    assert _build({**params, "qa": {**params["qa"], "heldout_fraction": 0.25}}) == 0
    df = qa.read_qa_csv("data/cifar_qa.csv", "data/cifar")
    held = df[qa.heldout(df)]
    assert len(held) == 5 and set(df.Split) == {"test"} and len(qa.part(df, "train")) == len(labels) - 5


def test_free_form_answers_get_token_f1_beside_the_blind_baseline(qa_csv, tiny_cifar, tmp_path):
    """The origin CSV's answers are sentences: the QA evaluation names their type free-form and gives
    token F1 (partial credit exact match cannot give) beside the blind baseline's; the generated CSV
    has no free-form type, so its report is what it was."""
    from vlmpipe.qa.evaluate import score_vqa
    from vlmpipe.qa.heldout import free_form_types

    test = cifar.load_split(tiny_cifar, "test")
    src = _origin_csv(tmp_path / "origin.csv", test.labels, test.label_names)
    df = qa_source.write_user_csv(src, tmp_path / "qa.csv", tiny_cifar, "auto", 0.2, seed=0)
    assert free_form_types(df) == ["unknown"]
    held = qa.part(df, "test")
    truth = [[(q, a, "unknown") for q, a in _origin_turns(i, lab)]
             for i, lab in zip(held.Dataset_Index, held.Class_Label)]
    right = score_vqa(df, truth, [[a for _, a, _ in t] for t in truth])
    ff = right["free_form"]
    assert ff["types"] == ["unknown"] and ff["n_questions"] == 5 * len(held) == right["n_questions"]
    assert ff["exact_match"] == ff["token_f1"] == 1.0 > ff["blind_token_f1"] > ff["blind_exact_match"]
    # "frame" for "A circle in the middle of the frame.": no exact match, token F1 2·1·(1/5)/(1 + 1/5) = 1/3.
    part_right = score_vqa(df, truth, [[a if k != 1 else "frame" for k, (_, a, _) in enumerate(t)] for t in truth])
    assert part_right["free_form"]["exact_match"] == pytest.approx(4 / 5)
    assert part_right["free_form"]["token_f1"] == pytest.approx((4 + 1 / 3) / 5)
    assert part_right["free_form"]["blind_token_f1"] == ff["blind_token_f1"]

    generated = qa.read_qa_csv(qa_csv, tiny_cifar)
    assert free_form_types(generated) == []
    rows = qa.part(generated, "test").head(3)
    g_truth = [[(r[f"Q{k}"], r[f"A{k}"], r[f"T{k}"]) for k in range(1, 6)] for r in rows.to_dict("records")]
    assert "free_form" not in score_vqa(generated, g_truth, [[a for _, a, _ in t] for t in g_truth])
