"""CIFAR-10 python batches: the reader.

Both sources (``vlmpipe/sources/cifar.py``: the synthetic shapes or the official
tarball) end up as ``<root>/cifar-10-batches-py/`` in the official format, so
one reader serves both:

- ``data_batch_1`` … ``data_batch_5`` and ``test_batch``: pickled dicts with
  ``b"data"`` (N×3072 uint8, channel-planar: 1024 red, then green, then blue,
  rows top to bottom), ``b"labels"``, ``b"filenames"``, ``b"batch_label"``;
- ``batches.meta``: ``b"label_names"``.

The batches are pickles, which can run arbitrary code when loaded. They are
read with an unpickler that resolves only the few globals a numpy array needs.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlmpipe.core.errors import UserError

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
