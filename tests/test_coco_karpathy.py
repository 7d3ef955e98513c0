"""coco.split: karpathy -- data/coco split as captioning papers report it, from a split file in the
real dataset_coco.json format over COCO 2017 archives in the official layout (tests/standins.py)."""
from __future__ import annotations

import hashlib
import json
import re
import zipfile
from collections import defaultdict
from pathlib import Path

import pytest

import standins
from vlmpipe.core.errors import UserError
from vlmpipe.data.coco import CocoCaptions
from vlmpipe.sources import coco as coco_source
from vlmpipe.sources.params import CocoParams

# Karpathy split of each image, by its position among the sorted ids of the COCO 2017 archive holding it.
# Karpathy's test and restval images come from val2014, which COCO 2017 spread over train2017 and val2017:
# every Karpathy split takes images from both archives here.
TRAIN2017 = ["train"] * 5 + ["test"] * 2 + ["val"] * 2 + ["restval"] * 3
VAL2017 = ["restval", "restval", "test", "test", "test", "val"]


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    """The three COCO 2017 archives, and every image's captions and JPEG bytes by id."""
    d = tmp_path_factory.mktemp("coco2017")
    paths = standins.coco2017_archives(d, len(TRAIN2017), len(VAL2017), seed=5)
    captions, jpegs, home = defaultdict(list), {}, {}
    with zipfile.ZipFile(paths["annotations_trainval2017.zip"]) as zf:
        for split in ("train", "val"):
            data = json.loads(zf.read(f"annotations/captions_{split}2017.json"))
            for a in data["annotations"]:
                captions[a["image_id"]].append(a["caption"].strip())
            for im in data["images"]:
                home[im["id"]] = split
    for split in ("train", "val"):
        with zipfile.ZipFile(paths[f"{split}2017.zip"]) as zf:
            for name in zf.namelist():
                if name.endswith(".jpg"):
                    jpegs[int(Path(name).stem)] = zf.read(name)
    ids = {s: sorted(i for i, h in home.items() if h == s) for s in ("train", "val")}
    karpathy = {**dict(zip(ids["train"], TRAIN2017)), **dict(zip(ids["val"], VAL2017))}
    return d, karpathy, dict(captions), jpegs


def split_file_json(karpathy: dict[int, str], captions: dict[int, list[str]]) -> dict:
    """dataset_coco.json as Karpathy published it: COCO 2014 file names, tokenised sentences."""
    images, sentid = [], 0
    for imgid, (cocoid, split) in enumerate(sorted(karpathy.items())):
        folder = "train2014" if split == "train" else "val2014"
        sentences = []
        for raw in captions.get(cocoid, ["A cat on a sofa."]):
            tokens = re.findall(r"[a-z0-9]+", raw.lower())
            sentences.append({"tokens": tokens, "raw": raw, "imgid": imgid, "sentid": sentid})
            sentid += 1
        images.append({"filepath": folder, "sentids": [s["sentid"] for s in sentences],
                       "filename": f"COCO_{folder}_{cocoid:012d}.jpg", "imgid": imgid, "split": split,
                       "sentences": sentences, "cocoid": cocoid})
    return {"images": images, "dataset": "coco"}


def write_split(path: Path, data, *, zipped: bool = False) -> Path:
    text = data if isinstance(data, str) else json.dumps(data)
    if zipped:  # caption_datasets.zip: a folder holding the three splits
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("caption_datasets/dataset_flickr8k.json", json.dumps({"images": [], "dataset": "flickr8k"}))
            zf.writestr("caption_datasets/dataset_coco.json", text)
    else:
        path.write_text(text)
    return path


def params(src: Path, split_file: Path, **kw) -> CocoParams:
    return CocoParams(source="coco2017", local_dir=str(src), verify=False, split="karpathy",
                      split_path=str(split_file), **kw)


def test_images_land_in_the_split_the_file_names(archives, tmp_path, caplog):
    src, karpathy, captions, jpegs = archives
    split_file = write_split(tmp_path / "dataset_coco.json", split_file_json(karpathy, captions))
    before = split_file.read_bytes()
    out = tmp_path / "coco"
    counts = coco_source.build(params(src, split_file), 0, out)
    want = {"train": sorted(i for i, s in karpathy.items() if s in ("train", "restval")),
            "val": sorted(i for i, s in karpathy.items() if s == "test")}
    assert counts == {"train": len(want["train"]), "val": len(want["val"])} == {"train": 10, "val": 5}
    for split in ("train", "val"):
        ds = CocoCaptions(out, split)
        assert ds.ids == want[split]
        with zipfile.ZipFile(out / f"{split}2017.zip") as zf:
            assert sorted(zf.namelist()) == [f"{split}2017/{i:012d}.jpg" for i in want[split]]
            for i in want[split]:
                assert zf.read(f"{split}2017/{i:012d}.jpg") == jpegs[i]  # the archive's bytes, whichever held it
        for i in want[split]:
            assert sorted(ds.captions(i)) == sorted(captions[i])  # COCO 2017's captions of the image, all
    assert not set(want["train"]) & set(want["val"])
    assert split_file.read_bytes() == before
    # No sha256 set: the file's is logged, to pin it.
    assert hashlib.sha256(before).hexdigest() in caplog.text and "coco.split_sha256" in caplog.text


def test_a_subset_per_split_and_the_zip_as_published(archives, tmp_path):
    src, karpathy, captions, _ = archives
    split_file = write_split(tmp_path / "caption_datasets.zip", split_file_json(karpathy, captions), zipped=True)
    sha = hashlib.sha256(split_file.read_bytes()).hexdigest()
    out = tmp_path / "coco"
    p = params(src, split_file, split_sha256=sha.upper(), max_images=3)
    assert coco_source.build(p, 0, out) == {"train": 3, "val": 3}
    assert set(CocoCaptions(out, "val").ids) <= {i for i, s in karpathy.items() if s == "test"}
    assert set(CocoCaptions(out, "train").ids) <= {i for i, s in karpathy.items() if s in ("train", "restval")}


def test_the_split_file_from_a_url(archives, tmp_path, file_server):
    src, karpathy, captions, _ = archives
    zipped = write_split(tmp_path / "caption_datasets.zip", split_file_json(karpathy, captions), zipped=True)
    file_server.files["/karpathy/caption_datasets.zip"] = zipped.read_bytes()
    url = file_server.url("/karpathy/caption_datasets.zip")
    sha = hashlib.sha256(zipped.read_bytes()).hexdigest()
    p = CocoParams(source="coco2017", local_dir=str(src), verify=False, split="karpathy", split_url=url,
                   split_sha256=sha)
    assert coco_source.build(p, 0, tmp_path / "a", download_dir=tmp_path / "dl") == {"train": 10, "val": 5}
    assert (tmp_path / "dl/karpathy/caption_datasets.zip").read_bytes() == zipped.read_bytes()
    # A wrong checksum: the download is refused and not kept.
    p.split_sha256 = "0" * 64
    with pytest.raises(UserError) as e:
        coco_source.build(p, 0, tmp_path / "b", download_dir=tmp_path / "dl2")
    msg = str(e.value)
    assert re.match(r"coco\.split_url: \S*caption_datasets\.zip: sha256 mismatch \(expected 0{64}, got " + sha,
                    msg), msg
    assert "\n" not in msg and not (tmp_path / "dl2/karpathy/caption_datasets.zip").exists()
    assert not (tmp_path / "b").exists()


def _one_line(p: CocoParams, out: Path) -> str:
    with pytest.raises(UserError) as e:
        coco_source.build(p, 0, out)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg and " object at 0x" not in msg
    assert not out.exists(), "a refused split file left output behind"
    return msg


def test_every_image_the_split_names_must_be_found(archives, tmp_path):
    src, karpathy, captions, _ = archives
    data = split_file_json({**karpathy, 999_999_001: "test", 999_999_002: "restval"}, captions)
    split_file = write_split(tmp_path / "dataset_coco.json", data)
    msg = _one_line(params(src, split_file), tmp_path / "out")
    assert msg.startswith(f"{split_file}: cocoid 999999001 is not a captioned image") and \
        "(2 of the 20 images it names are not)" in msg, msg


def test_an_image_missing_from_its_archive_is_named(archives, tmp_path):
    src, karpathy, captions, _ = archives
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("annotations_trainval2017.zip", "train2017.zip"):
        (mine / name).write_bytes((src / name).read_bytes())
    gone = sorted(i for i, s in karpathy.items() if s == "test")[-1]
    with zipfile.ZipFile(src / "val2017.zip") as zin, zipfile.ZipFile(mine / "val2017.zip", "w") as zout:
        for info in zin.infolist():
            if info.filename != f"val2017/{gone:012d}.jpg":
                zout.writestr(info, zin.read(info))
    split_file = write_split(tmp_path / "dataset_coco.json", split_file_json(karpathy, captions))
    msg = _one_line(params(mine, split_file), tmp_path / "out")
    assert msg.startswith(f"{mine / 'val2017.zip'}: missing member val2017/{gone:012d}.jpg (cocoid {gone} of "
                          f"{split_file}; 1 of its images"), msg


@pytest.mark.parametrize("content, zipped, words", [
    ("{\"images\": [", False, "dataset_coco.json: not a readable JSON split file (JSONDecodeError: "),
    ("[1, 2]", False, "dataset_coco.json: not a Karpathy split file"),
    ({"images": [{"cocoid": "391895", "split": "test"}], "dataset": "coco"}, False,
     "dataset_coco.json: images[0] needs an integer 'cocoid' and a 'split' of train, restval, val, test"),
    ({"images": [{"cocoid": 1, "split": "testing"}], "dataset": "coco"}, False, "images[0] needs an integer"),
    ({"images": [{"cocoid": 1, "split": "train"}, {"cocoid": 2, "split": "test"}, {"cocoid": 1, "split": "test"}],
      "dataset": "coco"}, False, "dataset_coco.json: cocoid 1 is listed twice (images[0] and images[2])"),
    ({"images": [{"cocoid": 1, "split": "train"}], "dataset": "coco"}, False,
     "dataset_coco.json: no image is in Karpathy's test split"),
    ({"images": [{"cocoid": 1, "split": "train"}], "dataset": "flickr30k"}, False,
     "dataset_coco.json: the Karpathy split of flickr30k, not of COCO"),
    ("{\"images\": [", True,
     "caption_datasets.zip: caption_datasets/dataset_coco.json: not a readable JSON split file"),
])
def test_a_malformed_split_file_is_one_line_naming_it(archives, tmp_path, content, zipped, words):
    src, _, _, _ = archives
    split_file = write_split(tmp_path / ("caption_datasets.zip" if zipped else "dataset_coco.json"), content,
                             zipped=zipped)
    msg = _one_line(params(src, split_file), tmp_path / "out")
    assert msg.startswith(str(split_file)) and words in msg, msg


def test_a_zip_without_the_coco_split_is_named(archives, tmp_path):
    src, _, _, _ = archives
    split_file = tmp_path / "caption_datasets.zip"
    with zipfile.ZipFile(split_file, "w") as zf:
        zf.writestr("dataset_flickr8k.json", "{}")
    msg = _one_line(params(src, split_file), tmp_path / "out")
    assert msg == f"{split_file}: no dataset_coco.json in this archive (caption_datasets.zip holds it)", msg


def test_a_wrong_checksum_or_path_names_the_key_and_file(archives, tmp_path):
    src, karpathy, captions, _ = archives
    split_file = write_split(tmp_path / "dataset_coco.json", split_file_json(karpathy, captions))
    sha = hashlib.sha256(split_file.read_bytes()).hexdigest()
    msg = _one_line(params(src, split_file, split_sha256="ab" * 32), tmp_path / "out")
    assert msg == f"coco.split_sha256: {split_file}: sha256 mismatch (expected {'ab' * 32}, got {sha})", msg
    msg = _one_line(params(src, tmp_path / "nowhere.json"), tmp_path / "out")
    assert msg == f"coco.split_path: {tmp_path / 'nowhere.json'}: not found", msg
    assert split_file.exists()  # the user's file is never deleted


@pytest.mark.parametrize("kw, key, words", [
    ({"split": "karpathy2014"}, "coco.split", "must be 'coco2017' or 'karpathy'"),
    ({"split": "karpathy", "source": "synthetic"}, "coco.split", "needs coco.source: coco2017"),
    ({"split_path": "/data/dataset_coco.json"}, "coco.split_path", "outside inputs/data/"),
    ({"split_path": "inputs/data/dataset_coco.json", "split_url": "https://example.org/x.zip"}, "coco.split_path",
     "not both"),
    ({"split_url": "ftp://example.org/caption_datasets.zip"}, "coco.split_url", "must be an http(s) URL"),
    ({"split_sha256": "abc"}, "coco.split_sha256", "must be 64 hex digits"),
])
def test_params_are_checked_naming_the_key(kw, key, words):
    p = CocoParams(**{"source": "coco2017", **kw})
    with pytest.raises(UserError) as e:
        p.validate("coco")
    msg = str(e.value)
    assert msg.startswith(f"{key}: ") and words in msg and "\n" not in msg, msg
