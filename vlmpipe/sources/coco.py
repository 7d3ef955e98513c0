"""COCO 2017 for download_coco: one ingest path for both sources.

A *source folder* holds the three files under their official names:

    annotations_trainval2017.zip   (annotations/captions_{train,val}2017.json)
    train2017.zip                  (train2017/000000000123.jpg, ...)
    val2017.zip

For ``coco.source: coco2017`` they are downloaded (cached in the download folder, resumable) or
taken from ``coco.local_dir``; for ``synthetic`` they are generated from the shapes world.
``ingest`` then writes the output folder that ``vlmpipe.data.coco.CocoCaptions`` reads, keeping
``coco.max_images`` images per split (a seeded subset). The synthetic source adds the facts of each
kept scene (``write_scene_facts``: ``annotations/scenes_{split}2017.json``), which the scene score of
the captioner reads; real COCO has none.

``coco.split: karpathy`` splits the same images as captioning papers do: ``ingest_karpathy`` writes
the same layout, with train = Karpathy's train + restval and val = Karpathy's test, each image taken
from whichever COCO 2017 archive holds it (``{cocoid:012d}.jpg``) with its captions from the COCO
2017 caption files. Karpathy's val images are left out.

Synthetic images are JPEG (quality 95, no chroma subsampling): the real format, so the real
decoder and file names are exercised, while 4:4:4 keeps the colour edges of small shapes crisp.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import zipfile
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlmpipe.core.download import default_download_dir, download, file_digest, open_zip, verify_file
from vlmpipe.core.errors import UserError
from vlmpipe.data.coco import (MAX_CAPTIONS_BYTES, MAX_IMAGE_BYTES, SPLITS, CocoCaptions, captions_member,
                               check_member_size, image_member, load_captions_json, scenes_member)
from vlmpipe.sources import remote, shapes

log = logging.getLogger(__name__)


ANNOTATIONS_ZIP = "annotations_trainval2017.zip"
OFFICIAL = remote.COCO_2017  # name -> (url, size in bytes, md5), as published
# A fixed timestamp makes the zips we write byte-identical across runs.
_ZIP_TIME = (2017, 1, 1, 0, 0, 0)
_INFO = {
    "description": "vlmpipe synthetic shapes world in COCO 2017 caption format",
    "url": "",
    "version": "1.0",
    "year": 2017,
    "contributor": "vlmpipe",
    "date_created": "2017/09/01",
}
_LICENSES = [{"url": "https://creativecommons.org/publicdomain/zero/1.0/", "id": 1, "name": "CC0 1.0"}]


def _zip_write(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    info.compress_type = zipfile.ZIP_STORED  # JPEGs do not compress; stored members read fastest
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def write_synthetic_source(src: str | os.PathLike, n_train: int, n_val: int, image_size: int,
                           seed: int) -> dict[int, dict]:
    """Generate the three official-format files of the shapes world into ``src``; return each image's
    scene facts (``scene_facts``) by image id."""
    src = Path(src)
    src.mkdir(parents=True, exist_ok=True)
    # Sparse, unique ids like the real ones, so nothing downstream can assume 0..N-1.
    ids = np.random.default_rng([seed, 2017]).choice(np.arange(1, 600_000), size=n_train + n_val, replace=False)
    split_ids = {"train": sorted(int(i) for i in ids[:n_train]), "val": sorted(int(i) for i in ids[n_train:])}
    ann_id = 0
    captions_json, facts = {}, {}
    for split in SPLITS:
        images, annotations = [], []
        with zipfile.ZipFile(src / f"{split}2017.zip", "w") as zf:
            for image_id in tqdm(split_ids[split], desc=f"coco {split}", mininterval=2.0, leave=False):
                # One generator per image: any image can be regenerated alone.
                rng = np.random.default_rng([seed, image_id])
                scene = shapes.random_scene(rng, image_size)
                facts[image_id] = scene_facts(scene)
                file_name = f"{image_id:012d}.jpg"
                buf = io.BytesIO()
                Image.fromarray(scene.image).save(buf, format="JPEG", quality=95, subsampling=0)
                _zip_write(zf, image_member(split, file_name), buf.getvalue())
                images.append({
                    "license": 1, "file_name": file_name, "coco_url": "", "height": image_size,
                    "width": image_size, "date_captured": "2017-01-01 00:00:00", "flickr_url": "", "id": image_id,
                })
                for caption in shapes.scene_captions(scene, rng, 5):
                    ann_id += 1
                    annotations.append({"image_id": image_id, "id": ann_id, "caption": caption})
        captions_json[split] = {"info": _INFO, "licenses": _LICENSES, "images": images, "annotations": annotations}
    with zipfile.ZipFile(src / ANNOTATIONS_ZIP, "w", zipfile.ZIP_DEFLATED) as zf:
        for split in SPLITS:
            info = zipfile.ZipInfo(captions_member(split), date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, json.dumps(captions_json[split]))
    return facts


def scene_vocabulary() -> dict:
    """The shapes world's words, so a reader of the facts needs no copy of ``shapes``' constants; a
    quadrant with its column and row (0 left/top, 1 right/bottom), which relations are read from."""
    return {
        "kinds": list(shapes.SHAPES), "colours": list(shapes.COLOURS), "sizes": list(shapes.SIZES),
        "backgrounds": list(shapes.BACKGROUNDS),
        "quadrants": [{"name": name, "column": col, "row": row}
                      for name, (col, row) in zip(shapes.QUADRANT_NAMES, shapes.QUADRANTS)],
    }


def scene_facts(scene: shapes.Scene) -> dict:
    """What is true of ``scene`` in the vocabulary's words: its shapes in reading order, its background."""
    return {"background": scene.background,
            "shapes": [{"kind": s.kind, "colour": s.colour, "size": s.size,
                        "quadrant": shapes.QUADRANT_NAMES[s.quadrant]} for s in scene.shapes]}


def write_scene_facts(out: str | os.PathLike, facts: dict[int, dict]) -> None:
    """Beside the captions of a synthetic output folder, the facts (``write_synthetic_source``'s) of
    every scene it kept, in image-id order."""
    out = Path(out)
    for split in SPLITS:
        scenes = [{"image_id": iid, **facts[iid]} for iid in CocoCaptions(out, split).ids]
        (out / scenes_member(split)).write_text(
            json.dumps({"vocabulary": scene_vocabulary(), "scenes": scenes}), encoding="utf-8")


def download_official(download_dir: str | os.PathLike | None = None, base_url: str | None = None, verify: bool = True) -> Path:
    """Fetch the three official archives into ``download_dir``; return it.

    ``base_url`` replaces ``http://images.cocodataset.org`` (a mirror, or a
    test server); ``verify=False`` skips the published size/md5 (for mirrors
    serving other bytes).
    """
    ddir = Path(download_dir) if download_dir else default_download_dir() / "coco2017"
    for name, (_, size, md5) in OFFICIAL.items():
        download(remote.coco_url(name, base_url or ""), ddir / name, size=size if verify else None, md5=md5 if verify else None,
                 key="coco.url" if base_url else "coco.source",
                 hint=f"put {name} in {ddir}, set coco.local_dir to a folder holding the three archives, "
                      "or coco.url to a mirror" + ("" if not verify else " (coco.verify: false if its bytes differ)"))
    return ddir


def local_source(local_dir: str | os.PathLike, verify: bool = True) -> Path:
    """A folder the user filled with the three official archives: checked in place, never modified."""
    d = Path(local_dir)
    if not d.is_dir():
        raise UserError(f"coco.local_dir: {d} is not a folder (it should hold {', '.join(OFFICIAL)})")
    for name, (_, size, md5) in OFFICIAL.items():
        verify_file(d / name, size=size if verify else None, md5=md5 if verify else None,
                    hint="set coco.verify: false if this copy is meant to differ from the published archive"
                    if verify else "coco.local_dir must hold the three official archives")
    return d


def source_folder(params, download_dir: str | os.PathLike | None = None) -> Path:
    """Where the official archives of ``params`` (``CocoParams``) are: the user's copy or the download cache."""
    if params.local_dir:
        return local_source(params.local_dir, params.verify)
    return download_official(download_dir, params.url or None, params.verify)


def select_subset(ids: list[int], max_images: int, seed: int, split: str) -> list[int]:
    """A seeded, sorted subset of ``max_images`` ids (all of them when 0 or more than there are)."""
    ids = sorted(ids)
    if max_images == 0 or max_images >= len(ids):
        return ids
    rng = np.random.default_rng([seed, SPLITS.index(split), 2017])
    return sorted(ids[i] for i in rng.choice(len(ids), size=max_images, replace=False))


def _copy_images(src_zip: Path, dst_zip: Path, members: list[str], link: bool) -> None:
    with open_zip(src_zip) as zin:
        files = {i.filename for i in zin.infolist() if not i.is_dir()}
        missing = [m for m in members if m not in files]
        if missing:
            raise UserError(f"{src_zip}: missing member {missing[0]} ({len(missing)} images of the caption file are not in the archive)")
        if files == set(members):
            # Everything is kept: reuse the archive as is. An archive of ours (the download folder)
            # is hard-linked: with the repository's DVC cache type (hardlink,copy) the cache links the
            # same inode, so download folder, workspace and cache hold one copy. A user's file is
            # copied, never linked: DVC would make it read-only, and a later write to it (an append
            # by `curl -C -` or `rsync --inplace`) would change the cached object under DVC.
            if not link:
                log.info("%s: copying %.1f GB into %s (a coco.local_dir file is never linked)", src_zip,
                         src_zip.stat().st_size / 1e9, dst_zip.parent)
                shutil.copyfile(src_zip, dst_zip)
                return
            try:
                os.link(src_zip, dst_zip)
            except OSError as e:
                log.warning("%s: cannot hard-link it into %s (%s); copying %.1f GB instead. Put the download "
                            "folder (VLMPIPE_DOWNLOAD_DIR) on the repository's filesystem to keep one copy",
                            src_zip, dst_zip.parent, e.strerror or e, src_zip.stat().st_size / 1e9)
                shutil.copyfile(src_zip, dst_zip)
            return
        with zipfile.ZipFile(dst_zip, "w", allowZip64=True) as zout:
            for name in tqdm(members, desc=dst_zip.name, mininterval=2.0, leave=False):
                _zip_write(zout, name, _read_image(zin, src_zip, name))


def _read_image(zin: zipfile.ZipFile, src_zip: Path, name: str) -> bytes:
    check_member_size(zin, src_zip, name, MAX_IMAGE_BYTES)
    try:
        return zin.read(name)  # checks the member's CRC
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise UserError(f"{src_zip}: member {name} is corrupt ({e})") from None


def ingest(src: str | os.PathLike, out: str | os.PathLike, max_images: int, seed: int, *,
           link: bool = True) -> dict[str, int]:
    """Write the output folder from an official-format source folder; return images per split.

    ``link``: the source's archives are the project's own (downloaded or generated) and may be
    hard-linked into ``out``; False for the user's files, which are only read."""
    src, out = Path(src), Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    counts = {}
    ann_zip = src / ANNOTATIONS_ZIP
    with open_zip(ann_zip) as zf:
        captions = {split: load_captions_json(zf, ann_zip, captions_member(split)) for split in SPLITS}
    for split in SPLITS:
        data = captions[split]
        by_image = defaultdict(list)
        for a in data["annotations"]:
            by_image[a["image_id"]].append(a)
        images = {im["id"]: im for im in data["images"] if by_image.get(im["id"])}
        if not images:
            raise UserError(f"{ann_zip}: {captions_member(split)} has no image with a caption "
                            f"({len(data['images'])} images, {len(data['annotations'])} captions)")
        keep = select_subset(list(images), max_images, seed, split)
        keep_set = set(keep)
        subset = {
            "info": data.get("info", {}),
            "licenses": data.get("licenses", []),
            "images": [images[i] for i in keep],
            "annotations": sorted((a for a in data["annotations"] if a["image_id"] in keep_set), key=lambda a: (a["image_id"], a.get("id", 0))),
        }
        (out / captions_member(split)).write_text(json.dumps(subset), encoding="utf-8")
        _copy_images(src / f"{split}2017.zip", out / f"{split}2017.zip",
                     [image_member(split, images[i]["file_name"]) for i in keep], link)
        counts[split] = len(keep)
        log.info("coco %s: %d images, %d captions", split, len(keep), len(subset["annotations"]))
    return counts


KARPATHY_SPLITS = ("train", "restval", "val", "test")


def read_karpathy(path: str | os.PathLike) -> dict[str, list[int]]:
    """cocoids by Karpathy split ("train", "restval", "val", "test") from ``path``: dataset_coco.json,
    or a zip holding it (Karpathy's caption_datasets.zip)."""
    path = Path(path)
    where = str(path)
    try:
        if zipfile.is_zipfile(path):
            with open_zip(path) as zf:
                names = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == remote.KARPATHY_FILE]
                if not names:
                    raise UserError(f"{path}: no {remote.KARPATHY_FILE} in this archive "
                                    "(caption_datasets.zip holds it)")
                where = f"{path}: {names[0]}"
                check_member_size(zf, path, names[0], MAX_CAPTIONS_BYTES)
                data = json.loads(zf.read(names[0]))
        else:
            if path.stat().st_size > MAX_CAPTIONS_BYTES:
                raise UserError(f"{path}: {path.stat().st_size} bytes, more than {MAX_CAPTIONS_BYTES}: "
                                "not a split file")
            data = json.loads(path.read_bytes())
    except (ValueError, zipfile.BadZipFile, zlib.error, EOFError, RecursionError) as e:
        raise UserError(f"{where}: not a readable JSON split file ({type(e).__name__}: {str(e)[:200]})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or type(e).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{where}: not a Karpathy split file (dataset_coco.json has an 'images' list)")
    if data.get("dataset", "coco") != "coco":
        raise UserError(f"{where}: the Karpathy split of {str(data['dataset'])[:40]}, not of COCO "
                        f"({remote.KARPATHY_FILE} is COCO's)")
    splits: dict[str, list[int]] = {s: [] for s in KARPATHY_SPLITS}
    seen: dict[int, int] = {}
    for i, im in enumerate(data["images"]):
        cocoid, split = (im.get("cocoid"), im.get("split")) if isinstance(im, dict) else (None, None)
        if type(cocoid) is not int or split not in splits:
            raise UserError(f"{where}: images[{i}] needs an integer 'cocoid' and a 'split' of "
                            f"{', '.join(KARPATHY_SPLITS)}")
        if cocoid in seen:
            raise UserError(f"{where}: cocoid {cocoid} is listed twice (images[{seen[cocoid]}] and images[{i}])")
        seen[cocoid] = i
        splits[split].append(cocoid)
    for split in ("train", "test"):
        if not splits[split]:
            raise UserError(f"{where}: no image is in Karpathy's {split} split")
    return splits


def karpathy_file(params, download_dir: str | os.PathLike | None = None) -> Path:
    """The split file of ``params`` (``CocoParams``): the user's ``split_path``, or downloaded; checked
    against ``split_sha256`` when set."""
    sha = params.split_sha256.lower() or None
    if params.split_path:
        path = Path(params.split_path)
        try:
            verify_file(path, sha256=sha)
        except UserError as e:
            raise UserError(f"coco.{'split_sha256' if path.is_file() else 'split_path'}: {e}") from None
    else:
        url, name = remote.karpathy_split(params.split_url)
        ddir = (Path(download_dir) if download_dir else default_download_dir()) / "karpathy"
        path = download(url, ddir / name, sha256=sha, key="coco.split_url" if params.split_url else "coco.split",
                        hint=f"put {name} in {ddir}, or set coco.split_path to a copy under inputs/data/, "
                             "or coco.split_url to a mirror")
    if not sha:
        log.warning("%s: sha256 %s, not checked (none is published): set coco.split_sha256 to it to pin "
                    "this file", path, file_digest(path, "sha256"))
    return path


def ingest_karpathy(src: str | os.PathLike, out: str | os.PathLike, karpathy: dict[str, list[int]],
                    split_file: str | os.PathLike, max_images: int, seed: int) -> dict[str, int]:
    """Write the output folder from an official-format source folder, split as ``karpathy``
    (``read_karpathy`` of ``split_file``) says; return images per split. Every image the split file
    names must be a captioned image of the COCO 2017 caption files; the ones used must be in their
    archive."""
    src, out = Path(src), Path(out)
    wanted = {"train": karpathy["train"] + karpathy["restval"], "val": karpathy["test"]}
    ann_zip = src / ANNOTATIONS_ZIP
    with open_zip(ann_zip) as zf:
        captions = {split: load_captions_json(zf, ann_zip, captions_member(split)) for split in SPLITS}
    home: dict[int, str] = {}  # cocoid -> the COCO 2017 split holding it
    images: dict[int, dict] = {}
    by_image: dict[int, list[dict]] = defaultdict(list)
    for split in SPLITS:
        for im in captions[split]["images"]:
            home[im["id"]], images[im["id"]] = split, im
        for a in captions[split]["annotations"]:
            by_image[a["image_id"]].append(a)
    named = [i for s in KARPATHY_SPLITS for i in karpathy[s]]
    missing = sorted(i for i in named if i not in images or not by_image.get(i))
    if missing:
        raise UserError(f"{split_file}: cocoid {missing[0]} is not a captioned image of the COCO 2017 caption "
                        f"files in {ann_zip} ({len(missing)} of the {len(named)} images it names are not)")
    keep = {split: select_subset(ids, max_images, seed, split) for split, ids in wanted.items()}
    with open_zip(src / "train2017.zip") as ztrain, open_zip(src / "val2017.zip") as zval:
        archives = {"train": ztrain, "val": zval}
        members = {s: set(archives[s].namelist()) for s in SPLITS}
        absent = sorted(i for s in SPLITS for i in keep[s]
                        if image_member(home[i], images[i]["file_name"]) not in members[home[i]])
        if absent:
            i = absent[0]
            raise UserError(f"{src / f'{home[i]}2017.zip'}: missing member "
                            f"{image_member(home[i], images[i]['file_name'])} (cocoid {i} of {split_file}; "
                            f"{len(absent)} of its images are not in the archives)")
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            subset = {
                "info": captions[split].get("info", {}),
                "licenses": captions[split].get("licenses", []),
                "images": [images[i] for i in keep[split]],
                "annotations": sorted((a for i in keep[split] for a in by_image[i]),
                                      key=lambda a: (a["image_id"], a.get("id", 0))),
            }
            (out / captions_member(split)).write_text(json.dumps(subset), encoding="utf-8")
            dst_zip = out / f"{split}2017.zip"
            with zipfile.ZipFile(dst_zip, "w", allowZip64=True) as zout:
                for i in tqdm(keep[split], desc=dst_zip.name, mininterval=2.0, leave=False):
                    name = images[i]["file_name"]
                    data = _read_image(archives[home[i]], src / f"{home[i]}2017.zip", image_member(home[i], name))
                    _zip_write(zout, image_member(split, name), data)
            log.info("coco %s (Karpathy %s): %d images, %d captions", split,
                     "train + restval" if split == "train" else "test", len(keep[split]), len(subset["annotations"]))
    log.info("Karpathy's val split (%d images) is not used", len(karpathy["val"]))
    return {split: len(keep[split]) for split in SPLITS}


def build(params, seed: int, out: str | os.PathLike, download_dir: str | os.PathLike | None = None) -> dict[str, int]:
    """Produce the ``data/coco`` folder ``out`` from ``params`` (a ``CocoParams``)."""
    out = Path(out)
    if params.source == "synthetic":
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".coco-src.", dir=out.parent) as tmp:
            facts = write_synthetic_source(tmp, params.synthetic_train_images, params.synthetic_val_images,
                                           params.image_size, seed)
            counts = ingest(tmp, out, params.max_images, seed)
        write_scene_facts(out, facts)
        return counts
    if params.split == "karpathy":  # read first: a wrong split file is said before a 19 GB download
        split_file = karpathy_file(params, download_dir)
        karpathy = read_karpathy(split_file)
    src = source_folder(params, download_dir)
    try:
        if params.split == "karpathy":
            return ingest_karpathy(src, out, karpathy, split_file, params.max_images, seed)
        return ingest(src, out, params.max_images, seed, link=not params.local_dir)
    except UserError as e:
        if params.local_dir or not str(e).startswith(str(src)):  # about the user's files, or the split file
            raise
        # Downloaded archives that passed every check they had (none, with coco.verify: false) but do
        # not read: they stay where they are, and each rerun would fail the same way.
        raise UserError(f"{e}; the archives were downloaded to {src}: delete the one named to download "
                        "it again") from None
