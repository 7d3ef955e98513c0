"""Atomic writes: a killed stage never leaves a half-written file that looks valid.

Every output goes to a temporary name in the same directory first and is moved
into place with ``os.replace``, which is atomic on POSIX filesystems.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from vlmpipe.core.errors import UserError


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; move it onto ``dest`` on success.

    Works for files and directories alike: whatever the caller creates at the
    yielded path replaces ``dest`` only if the block finishes without error.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    target = tmp / dest.name
    try:
        yield target
        if dest.is_dir() and not dest.is_symlink():
            # os.replace cannot overwrite a non-empty directory: move the old one
            # aside first so the swap window is two renames, never a partial tree.
            old = tmp / (dest.name + ".old")
            os.replace(dest, old)
            os.replace(target, dest)
        else:
            os.replace(target, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def scratch_dir(parent: str | os.PathLike, name: str) -> Iterator[Path]:
    """A working folder ``parent/.<name>-<pid>.tmp`` for this process, removed on exit.

    Unlike a folder in $TMPDIR, one left by a killed run (SIGKILL skips every cleanup) is found
    and removed by the next run in the same ``parent`` (a stage's checkpoint folder), instead of
    piling up where nobody looks.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for old in parent.glob(f".{name}-*.tmp"):
        pid = old.name[len(name) + 2:-4]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = parent / f".{name}-{os.getpid()}.tmp"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def relative_path(target: str | os.PathLike, start: str | os.PathLike) -> str:
    """``target`` relative to ``start`` (both resolved): how a saved model records a sibling folder."""
    return os.path.relpath(Path(target).resolve(), Path(start).resolve())


def write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(dest: str | os.PathLike, text: str) -> None:
    write_bytes(dest, text.encode("utf-8"))


def write_json(dest: str | os.PathLike, obj: Any) -> None:
    write_text(dest, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_json_file(path: str | os.PathLike, hint: str = "") -> dict:
    """A JSON object from ``path``, or one ``UserError`` naming the file (missing, not UTF-8, not
    JSON, not an object) and ``hint`` (what to do, e.g. which stage rebuilds it)."""
    path = Path(path)
    tail = f"; {hint}" if hint else ""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found{tail}") from None
    except IsADirectoryError:
        raise UserError(f"{path}: a folder, not a JSON file{tail}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: corrupt JSON ({str(e).splitlines()[0][:120]}){tail}") from None
    except RecursionError:
        raise UserError(f"{path}: corrupt JSON (nested too deeply){tail}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}{tail}")
    return data


def read_safetensors(path: str | os.PathLike, hint: str = "") -> dict:
    """The tensors of a safetensors file, or one ``UserError`` naming it (missing, truncated, corrupt)."""
    from safetensors.torch import load_file

    path = Path(path)
    tail = f"; {hint}" if hint else ""
    if not path.is_file():
        raise UserError(f"{path}: not found{tail}")
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise UserError(f"{path}: corrupt or truncated weights ({str(e).splitlines()[0][:120]}){tail}") from None
