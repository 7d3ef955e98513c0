"""CIFAR-10 python batches: synthetic writer, official ingest, reader.

Both sources end up as ``<root>/cifar-10-batches-py/`` in the official
format, so one reader serves both:

- ``data_batch_1`` … ``data_batch_5`` and ``test_batch``: pickled dicts with
  ``b"data"`` (N×3072 uint8, channel-planar: 1024 red, then green, then blue,
  rows top to bottom), ``b"labels"``, ``b"filenames"``, ``b"batch_label"``;
- ``batches.meta``: ``b"label_names"``.

The batches are pickles, which can run arbitrary code when loaded. They are
read with an unpickler that resolves only the few globals a numpy array needs.
"""
from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from vlmpipe.core import remote
from vlmpipe.core.download import default_download_dir, download, safe_extract, verify_file
from vlmpipe.core.errors import UserError
from vlmpipe.data import shapes

log = logging.getLogger(__name__)

URL, SIZE, MD5 = remote.CIFAR_10
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
SPLITS = ("train", "test")


@dataclass
class CifarSplit:
    images: np.ndarray       # uint8 N×32×32×3
    labels: np.ndarray       # int64 N
    label_names: list[str]
    filenames: list[str]

    def __len__(self) -> int:
        return len(self.labels)


# --- reading -------------------------------------------------------------------

def _numpy_globals() -> dict[tuple[str, str], Any]:
    from numpy._core import multiarray

    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 pickles of bytes at protocol <= 2 go through _codecs.encode:
        # a pure str -> bytes conversion.
        ("_codecs", "encode"): __import__("_codecs").encode,
    }
    # The official files (numpy 1.x era) name numpy.core; numpy 2 writes numpy._core.
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolve only numpy array reconstruction; any other global is refused."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self._path = path
        self._allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UserError(f"{self._path}: refusing to load a pickle that references {module}.{name} (not a CIFAR batch)") from None


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, path).load()
    except FileNotFoundError:
        raise UserError(f"{path}: CIFAR batch not found") from None
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged pickle can fail in many ways (EOFError, UnpicklingError, ValueError, ...)
        raise UserError(f"{path}: corrupt or truncated CIFAR batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a CIFAR batch (a pickled {type(obj).__name__}, expected a dict)")
    # Python 2 pickles loaded with encoding="bytes" have bytes keys.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def batch_dir(root: str | os.PathLike) -> Path:
    """``<root>/cifar-10-batches-py`` (``root`` may also be that folder itself)."""
    root = Path(root)
    return root if (root / META).exists() and not (root / BATCH_DIR).exists() else root / BATCH_DIR


def read_batch(path: str | os.PathLike, n_classes: int = 10) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One batch file → (data N×3072 uint8, labels int64, filenames)."""
    path = Path(path)
    d = _unpickle(path)
    data, labels = d.get("data"), d.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"{path}: 'data' must be an N×3072 uint8 array, got {desc}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise UserError(f"{path}: 'labels' is not a list of integers") from None
    if labels.shape != (len(data),):
        raise UserError(f"{path}: {labels.size} labels for {len(data)} images")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise UserError(f"{path}: labels must lie in 0..{n_classes - 1}, found {labels.min()}..{labels.max()}")
    names = [_text(f) for f in d.get("filenames", [])] or [f"{i:06d}.png" for i in range(len(data))]
    return data, labels, names


def read_label_names(root: str | os.PathLike) -> list[str]:
    path = batch_dir(root) / META
    names = _unpickle(path).get("label_names")
    if not isinstance(names, list) or not names:
        raise UserError(f"{path}: 'label_names' must be a non-empty list")
    return [_text(n) for n in names]


def load_split(root: str | os.PathLike, split: str) -> CifarSplit:
    """Read the ``train`` (5 batches) or ``test`` split from ``root`` (e.g. ``data/cifar``)."""
    if split not in SPLITS:
        raise UserError(f"split: must be 'train' or 'test', got {split!r}")
    bdir = batch_dir(root)
    label_names = read_label_names(root)
    files = TRAIN_BATCHES if split == "train" else (TEST_BATCH,)
    parts = [read_batch(bdir / f, len(label_names)) for f in files]
    data = np.concatenate([p[0] for p in parts])
    # Channel-planar rows -> N×32×32×3 (HWC, the layout PIL and torchvision expect).
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels = np.concatenate([p[1] for p in parts])
    filenames = [n for p in parts for n in p[2]]
    return CifarSplit(images=images, labels=labels, label_names=label_names, filenames=filenames)


# --- writing -------------------------------------------------------------------

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
                    local_path: str | os.PathLike = "", key: str = "cifar.source") -> None:
    """Extract the official tarball safely into ``root``: the user's copy at ``local_path`` (checked in
    place, never modified), or a download of ``url`` (cached, resumable, md5-verified)."""
    if local_path:
        tarball = verify_file(local_path, size=size, md5=md5,
                              hint="set cifar.verify: false if this copy is meant to differ from the published one"
                              if md5 else "")
    else:
        download_dir = Path(download_dir) if download_dir else default_download_dir()
        tarball = download(url, download_dir / "cifar-10-python.tar.gz", md5=md5, size=size, key=key,
                           hint=f"put cifar-10-python.tar.gz in {download_dir}, set cifar.local_path to a copy "
                                "of it, or cifar.url to a mirror")
    safe_extract(tarball, root)
    missing = [f for f in (*TRAIN_BATCHES, TEST_BATCH, META) if not (Path(root) / BATCH_DIR / f).exists()]
    if missing:
        raise UserError(f"{tarball}: not a CIFAR-10 python archive (no {BATCH_DIR}/{missing[0]})")


def build(params, seed: int, root: str | os.PathLike, download_dir: str | os.PathLike | None = None) -> None:
    """Create ``root/cifar-10-batches-py`` from ``params`` (a ``CifarParams``) and check it reads back."""
    if params.source == "synthetic":
        write_synthetic(root, params.synthetic_train_per_class, params.synthetic_test_per_class, seed)
    else:
        ingest_official(root, download_dir, params.url or URL, MD5 if params.verify else None,
                        SIZE if params.verify else None, local_path=params.local_path,
                        key="cifar.url" if params.url else "cifar.source")
    for split in SPLITS:
        s = load_split(root, split)
        log.info("cifar %s: %d images, %d classes", split, len(s), len(s.label_names))
