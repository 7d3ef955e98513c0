"""CIFAR-10 for build_cifar_qa_csv: the synthetic shapes in the official batch format, or the official
python tarball extracted safely. Either way ``<root>/cifar-10-batches-py/`` reads back with
``vlmpipe.data.cifar`` (the reader every later stage uses)."""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vlmpipe.core.download import default_download_dir, download, safe_extract, verify_file
from vlmpipe.core.errors import UserError
from vlmpipe.data.cifar import BATCH_DIR, META, SPLITS, TEST_BATCH, TRAIN_BATCHES, CifarSplit, load_split
from vlmpipe.sources import remote, shapes

log = logging.getLogger(__name__)

URL, SIZE, MD5 = remote.CIFAR_10


def _dump(path: Path, obj: dict) -> None:
    # Protocol 4: py3-native bytes opcodes (protocol 2 would round-trip every
    # byte of the image array through a latin-1 str, doubling the file).
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


def to_rows(images: np.ndarray) -> np.ndarray:
    """N×32×32×3 uint8 → N×3072 channel-planar rows (the CIFAR layout)."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def write_batches(root: Path, label_names: list[str], train: tuple, test: tuple) -> None:
    """Write ``(images, labels, filenames)`` tuples as the official batch files."""
    out = root / BATCH_DIR
    out.mkdir(parents=True, exist_ok=True)
    images, labels, names = train
    chunks = np.array_split(np.arange(len(labels)), len(TRAIN_BATCHES))
    for i, (fname, idx) in enumerate(zip(TRAIN_BATCHES, chunks), start=1):
        _dump(out / fname, {
            b"batch_label": f"training batch {i} of {len(TRAIN_BATCHES)}".encode(),
            b"labels": [int(labels[j]) for j in idx],
            b"data": to_rows(images[idx]),
            b"filenames": [names[j].encode() for j in idx],
        })
    images, labels, names = test
    _dump(out / TEST_BATCH, {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [int(x) for x in labels],
        b"data": to_rows(images),
        b"filenames": [n.encode() for n in names],
    })
    _dump(out / META, {
        b"label_names": [n.encode() for n in label_names],
        b"num_cases_per_batch": len(chunks[0]),
        b"num_vis": 3072,
    })


def synthetic_split(seed: int, split: str, per_class: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``per_class`` shape images of each of the 10 kinds, in shuffled order.

    File names record how each image was drawn (``red_large_star_dark_s_000012.png``,
    in the style of the official ``..._s_000012.png`` names), which lets tests
    check answers computed from pixels against the truth.
    """
    rng = np.random.default_rng([seed, SPLITS.index(split), 10])
    labels = rng.permutation(np.repeat(np.arange(len(shapes.SHAPES)), per_class))
    images = np.empty((len(labels), 32, 32, 3), dtype=np.uint8)
    names = []
    for i, label in enumerate(tqdm(labels, desc=f"cifar {split}", mininterval=2.0, leave=False)):
        img, sh, bg = shapes.shape_image(rng, shapes.SHAPES[label])
        images[i] = img
        names.append(f"{sh.colour}_{sh.size}_{sh.kind}_{bg}_s_{i:06d}.png")
    return images, labels.astype(np.int64), names


def write_synthetic(root: str | os.PathLike, train_per_class: int, test_per_class: int, seed: int) -> None:
    root = Path(root)
    train = synthetic_split(seed, "train", train_per_class)
    test = synthetic_split(seed, "test", test_per_class)
    write_batches(root, list(shapes.SHAPES), train, test)


def ingest_official(root: str | os.PathLike, download_dir: str | os.PathLike | None = None,
                    url: str = URL, md5: str | None = MD5, size: int | None = SIZE, *,
                    local_path: str | os.PathLike = "", key: str = "cifar.source") -> dict[str, CifarSplit]:
    """Extract the official tarball safely into ``root`` and read both splits back: the user's copy at
    ``local_path`` (checked in place, never modified), or a download of ``url`` (cached, resumable,
    md5-verified). A damaged batch is named as the archive's member, not as the extracted file."""
    if local_path:
        tarball = verify_file(local_path, size=size, md5=md5,
                              hint="set cifar.verify: false if this copy is meant to differ from the published one"
                              if md5 else "")
    else:
        download_dir = Path(download_dir) if download_dir else default_download_dir()
        tarball = download(url, download_dir / "cifar-10-python.tar.gz", md5=md5, size=size, key=key,
                           hint=f"put cifar-10-python.tar.gz in {download_dir}, set cifar.local_path to a copy "
                                "of it, or cifar.url to a mirror")
    try:
        safe_extract(tarball, root)
        missing = [f for f in (*TRAIN_BATCHES, TEST_BATCH, META) if not (Path(root) / BATCH_DIR / f).exists()]
        if missing:
            raise UserError(f"{tarball}: not a CIFAR-10 python archive (no {BATCH_DIR}/{missing[0]})")
        return {split: load_split(root, split) for split in SPLITS}
    except UserError as e:
        # The reader names the file it read, extracted into the stage's scratch folder, which is gone by
        # the time the user reads the line: name the archive and its member instead.
        extracted = f"{Path(root)}/"
        msg = f"{tarball}: member {str(e)[len(extracted):]}" if str(e).startswith(extracted) else str(e)
        if local_path:
            raise UserError(msg) from None
        # A download that passed every check it had (none, with cifar.verify: false) but is not the
        # archive: it stays where it is, and each rerun would fail the same way.
        raise UserError(f"{msg}; delete {tarball} to download it again") from None


def build(params, seed: int, root: str | os.PathLike, download_dir: str | os.PathLike | None = None) -> None:
    """Create ``root/cifar-10-batches-py`` from ``params`` (a ``CifarParams``) and check it reads back."""
    if params.source == "synthetic":
        write_synthetic(root, params.synthetic_train_per_class, params.synthetic_test_per_class, seed)
        splits = {split: load_split(root, split) for split in SPLITS}
    else:
        splits = ingest_official(root, download_dir, params.url or URL, MD5 if params.verify else None,
                                 SIZE if params.verify else None, local_path=params.local_path,
                                 key="cifar.url" if params.url else "cifar.source")
    for split, s in splits.items():
        log.info("cifar %s: %d images, %d classes", split, len(s), len(s.label_names))
