"""COCO 2017 captions: the reader of an ingested ``data/coco`` folder.

``download_coco`` (``vlmpipe/sources/coco.py``) writes the folder from the official archives or
the synthetic shapes world:

    annotations/captions_train2017.json, annotations/captions_val2017.json
    annotations/scenes_train2017.json, annotations/scenes_val2017.json   (synthetic only)
    train2017.zip, val2017.zip

Images stay inside the zips and are read in place by random access: 118k small files make DVC
push/pull take hours, a few large archives do not.
"""
from __future__ import annotations

import json
import os
import zipfile
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

from PIL import Image

from vlmpipe.core.download import open_zip
from vlmpipe.core.errors import UserError
from vlmpipe.core.images import decode_image

SPLITS = ("train", "val")


def captions_member(split: str) -> str:
    return f"annotations/captions_{split}2017.json"


def image_member(split: str, file_name: str) -> str:
    return f"{split}2017/{file_name}"


def scenes_member(split: str) -> str:
    """The shapes world's scene facts of ``split`` (synthetic folders only; ``vlmpipe.scoring.scene`` reads them)."""
    return f"annotations/scenes_{split}2017.json"


# Declared sizes beyond these are not COCO (captions_train2017.json is 92 MB, its largest image
# under 1 MB): refused before reading, so a crafted archive cannot exhaust memory.
MAX_CAPTIONS_BYTES = 1 << 30
MAX_IMAGE_BYTES = 64 << 20


def check_member_size(zf: zipfile.ZipFile, archive: Path, member: str, limit: int) -> None:
    try:
        size = zf.getinfo(member).file_size
    except KeyError:
        return  # reported as missing by the read
    if size > limit:
        raise UserError(f"{archive}: member {member} declares {size} bytes (more than {limit}): not a COCO file")


def load_captions_json(zf: zipfile.ZipFile, archive: Path, member: str) -> dict[str, Any]:
    where = f"{archive}: {member}"
    check_member_size(zf, archive, member, MAX_CAPTIONS_BYTES)
    try:
        with zf.open(member) as f:
            data = json.load(f)
    except KeyError:
        raise UserError(f"{archive}: missing member {member}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, zipfile.BadZipFile, zlib.error, EOFError, RecursionError) as e:
        raise UserError(f"{where}: corrupt caption file ({type(e).__name__}: {str(e)[:200]})") from None
    _check_captions(data, where)
    return data


def _check_captions(data: Any, where: str) -> None:
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise UserError(f"{where}: not a COCO caption file (needs 'images' and 'annotations' lists)")
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
            raise UserError(f"{where}: images[{i}] needs an integer 'id' and a string 'file_name'")
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or not isinstance(a.get("image_id"), int) or not isinstance(a.get("caption"), str):
            raise UserError(f"{where}: annotations[{i}] needs an integer 'image_id' and a string 'caption'")


class CocoCaptions:
    """Images and reference captions of one split of an ingested ``data/coco`` folder.

    The zip is opened lazily, once per process: the object can be pickled
    into DataLoader workers (or forked) and each worker gets its own handle.
    """

    def __init__(self, root: str | os.PathLike, split: str):
        if split not in SPLITS:
            raise UserError(f"split: must be 'train' or 'val', got {split!r}")
        self.root, self.split = Path(root), split
        self.archive = self.root / f"{split}2017.zip"
        ann = self.root / captions_member(split)
        try:
            data = json.loads(ann.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{ann}: not found (run `dvc repro download_coco`)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{ann}: corrupt caption file ({e})") from None
        _check_captions(data, str(ann))
        self._files = {im["id"]: im["file_name"] for im in data["images"]}
        caps: dict[int, list[str]] = defaultdict(list)
        for a in data["annotations"]:
            caps[a["image_id"]].append(a["caption"].strip())
        self._captions = dict(caps)
        self.ids: list[int] = sorted(i for i in self._files if i in self._captions)
        self._zip: zipfile.ZipFile | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def captions(self, image_id: int) -> list[str]:
        return list(self._captions[image_id])

    def member(self, image_id: int) -> str:
        return image_member(self.split, self._files[image_id])

    def _archive(self) -> zipfile.ZipFile:
        # A ZipFile shares one file offset: a handle inherited through fork
        # would be moved under the parent's feet, so each process opens its own.
        if self._zip is None or self._pid != os.getpid():
            self._zip = open_zip(self.archive)
            self._pid = os.getpid()
        return self._zip

    def image(self, image_id: int) -> Image.Image:
        name = self.member(image_id)
        zf = self._archive()
        check_member_size(zf, self.archive, name, MAX_IMAGE_BYTES)
        try:
            data = zf.read(name)  # checks the member's CRC
        except KeyError:
            raise UserError(f"{self.archive}: missing member {name}") from None
        except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise UserError(f"{self.archive}: member {name} is corrupt ({e})") from None
        # Decoded now, through the project's one image decoder: a truncated file fails here, not later in
        # a worker, and in the same words as in the CLI.
        return decode_image(data, f"{self.archive}: member {name}")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_zip"] = None
        state["_pid"] = None
        return state

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None
