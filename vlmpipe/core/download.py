"""The one download helper, and safe archive access.

``download(url, dest, size=..., md5=...)`` is used for every download in the
project (COCO, CIFAR-10, hub weights):

- streams to ``<dest>.part`` with a tqdm bar, and records beside it where the
  bytes came from (``<dest>.part.source``: the URL's hash, the size, ETag and
  Last-Modified);
- a dropped connection is resumed with an HTTP ``Range`` request (the server
  answers 206) and ``If-Range``: a file that changed on the server since is
  sent whole (200) and restarts from byte 0, as does a server that ignores
  ``Range``. A partial file from another URL, of another size, or with no
  record (another program's, an older version's) is discarded with a warning,
  never completed with this server's bytes;
- transient failures (connection errors, timeouts, 5xx) are retried with
  exponential backoff; 4xx is a user error at once;
- size and checksums are verified when known; only then is the partial file
  renamed onto ``dest``. A mismatch deletes the partial and raises a
  ``UserError`` naming the file, expected and got values. So ``dest`` exists
  only if it is complete and verified.

Archives come from the network, so a member could try to write outside its
folder. ``open_zip``/``open_tar`` check every member name before anything is
read, and ``safe_extract`` writes only regular files and folders: absolute
paths, ``..`` components and links are refused with a ``UserError`` naming
the archive and the member.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import socket
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from vlmpipe.core.errors import UserError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
USER_AGENT = "vlmpipe-download/1"


def default_download_dir() -> Path:
    """Where raw downloads are cached: ``$VLMPIPE_DOWNLOAD_DIR`` or ``~/.cache/vlmpipe/downloads``.

    Kept outside the DVC outputs on purpose: DVC deletes a stage's outputs
    before running it, and a half-finished 18 GB download must survive that
    to be resumed.
    """
    env = os.environ.get("VLMPIPE_DOWNLOAD_DIR")
    return Path(env) if env else Path.home() / ".cache" / "vlmpipe" / "downloads"


class _Dropped(Exception):
    """The connection ended before the announced length (resume and retry)."""


def file_digest(path: str | os.PathLike, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, name: str, size: int | None, checksums: dict[str, str]) -> str | None:
    """Return None if ``path`` matches, else a one-line description of the mismatch."""
    got_size = path.stat().st_size
    if size is not None and got_size != size:
        return f"{name}: size mismatch (expected {size} bytes, got {got_size})"
    for algo, expected in checksums.items():
        got = file_digest(path, algo)
        if got.lower() != expected.lower():
            return f"{name}: {algo} mismatch (expected {expected.lower()}, got {got})"
    return None


def safe_url(url: str) -> str:
    """``url`` without credentials (``https://user:pw@host`` -> ``https://***@host``), for messages."""
    u = urllib.parse.urlsplit(url)
    if u.username is None and u.password is None:
        return url
    host = u.hostname or ""
    netloc = f"***@{host}" + (f":{u.port}" if u.port else "")
    return urllib.parse.urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment))


# Failures that mean "this host cannot be reached at all" (no DNS, no route, nothing listening):
# retrying for a minute helps nobody on an offline machine or with a mistyped mirror.
_UNREACHABLE = (errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL)


def _unreachable(e: BaseException) -> bool:
    reason = getattr(e, "reason", e)
    return isinstance(reason, socket.gaierror) or getattr(reason, "errno", None) in _UNREACHABLE


def _verified_record() -> Path:
    return default_download_dir() / "verified.json"


def _stat_key(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _already_verified(path: Path, checksums: dict[str, str]) -> bool:
    """``path`` passed these checksums before and has not changed since (same size, mtime, inode):
    a 19 GB archive is hashed once, not on every run of its stage."""
    rec = _verified_record()
    try:
        entry = json.loads(rec.read_text()).get(str(path.resolve()))
    except (OSError, ValueError):
        return False
    return bool(entry) and entry.get("stat") == _stat_key(path) and \
        all(entry.get("checksums", {}).get(a) == v.lower() for a, v in checksums.items())


def _remember_verified(path: Path, checksums: dict[str, str]) -> None:
    if not checksums:
        return
    rec = _verified_record()
    try:
        data = json.loads(rec.read_text())
    except (OSError, ValueError):
        data = {}
    data[str(path.resolve())] = {"stat": _stat_key(path), "checksums": {a: v.lower() for a, v in checksums.items()}}
    try:
        rec.parent.mkdir(parents=True, exist_ok=True)
        tmp = rec.with_name(f".{rec.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, rec)
    except OSError as e:  # only a speed-up: never fail a download over it
        log.debug("cannot record verification in %s: %s", rec, e)


def verify_file(path: str | os.PathLike, *, size: int | None = None, md5: str | None = None,
                sha256: str | None = None, hint: str = "") -> Path:
    """Check a file that is already on disk (a user's copy, or an earlier download); never deletes it.

    A mismatch is a ``UserError`` naming the file, expected and got values, and ``hint``.
    """
    path = Path(path)
    checksums = {k: v for k, v in (("md5", md5), ("sha256", sha256)) if v}
    if not path.is_file():
        raise UserError(f"{path}: not found" + (f"; {hint}" if hint else ""))
    if path.stat().st_size == size and _already_verified(path, checksums):
        return path
    problem = _verify(path, str(path), size, checksums)
    if problem is not None:
        raise UserError(problem + (f"; {hint}" if hint else ""))
    _remember_verified(path, checksums)
    return path


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    size: int | None = None,
    md5: str | None = None,
    sha256: str | None = None,
    sha1: str | None = None,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
    key: str = "",
    hint: str = "",
) -> Path:
    """Download ``url`` to ``dest`` (resuming, retrying, verifying); return ``dest``.

    An existing ``dest`` that verifies is kept without touching the network.
    One that does not verify is never deleted (it may be a copy the user put
    there): that is a ``UserError`` saying what differs. An existing
    ``<dest>.part`` (always ours) is resumed. ``retries`` counts consecutive
    failed attempts: an attempt that received data resets it, so a long
    download over a flaky link still finishes. A host that cannot be reached
    at all (no DNS, no route, refused) fails at once, naming the file, where
    to put it by hand (``hint``) and the param (``key``) that chose the URL.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    source = _source_file(part)
    checksums = {k: v for k, v in (("md5", md5), ("sha1", sha1), ("sha256", sha256)) if v}
    dest.parent.mkdir(parents=True, exist_ok=True)
    shown = safe_url(url)
    where = f"{key}: " if key else ""

    if dest.exists():
        if _already_verified(dest, checksums) and (size is None or dest.stat().st_size == size):
            log.info("%s: already downloaded", dest)
            return dest
        problem = _verify(dest, str(dest), size, checksums)
        if problem is None:
            _remember_verified(dest, checksums)
            log.info("%s: already downloaded", dest)
            return dest
        raise UserError(f"{where}{problem}: it is not the file {shown} serves; move it away to download it again"
                        + (f", or {hint}" if hint else ""))

    if part.exists():
        record = _read_source(part)
        if record is None or record.get("url") != _url_id(url):
            log.warning("%s: a partial download %s; starting over", part,
                        "of another URL" if record else "with no record of where it came from")
            part.unlink()
            source.unlink(missing_ok=True)

    failures, received = 0, False
    while True:
        try:
            before = part.stat().st_size if part.exists() else 0
            _fetch(url, part, size, timeout, str(dest))
            break
        except UserError as e:  # the server announces another size: not the file the params expect
            raise UserError(f"{where}{e} at {shown}" + (f"; {hint}" if hint else "")) from None
        except _Dropped as e:
            reason = str(e)
        except (urllib.error.URLError, http.client.HTTPException, socket.timeout, ConnectionError, TimeoutError) as e:
            if isinstance(e, urllib.error.HTTPError) and 400 <= e.code < 500 and e.code not in (408, 429):
                raise UserError(f"{where}{shown}: HTTP {e.code} {e.reason}") from None
            if _unreachable(e) and not received:
                why = getattr(e, "reason", e)
                raise UserError(f"{where}{shown}: cannot reach the server ({getattr(why, 'strerror', None) or why}); "
                                f"{hint or f'put {dest.name} in {dest.parent}'}") from None
            reason = f"{type(e).__name__}: {e}"
        after = part.stat().st_size if part.exists() else 0
        received = received or after > before
        failures = 0 if after > before else failures + 1
        if failures > retries:
            raise UserError(f"{where}{shown}: download failed after {retries} retries ({reason}); "
                            f"rerun to resume from {part}")
        # A drop after progress reconnects at once; repeated failures back off.
        delay = backoff * 2 ** (failures - 1) if failures else 0.0
        log.warning("%s: %s; retrying in %.1fs from byte %d", dest.name, reason, delay, after)
        time.sleep(delay)

    problem = _verify(part, str(dest), size, checksums)
    if problem is not None:
        # Our own partial download is wrong: it must not survive under any name that could pass
        # for the real file; the next run starts from scratch.
        part.unlink(missing_ok=True)
        source.unlink(missing_ok=True)
        raise UserError(f"{where}{problem} (from {shown})")
    os.replace(part, dest)
    source.unlink(missing_ok=True)
    _remember_verified(dest, checksums)
    log.info("%s: downloaded and verified (%d bytes)", dest, dest.stat().st_size)
    return dest


_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def _source_file(part: Path) -> Path:
    return part.with_name(part.name + ".source")


def _url_id(url: str) -> str:
    # A hash: the URL may carry credentials, which must not be written to disk.
    return hashlib.sha256(url.encode()).hexdigest()


def _read_source(part: Path) -> dict | None:
    """Where the bytes of ``part`` came from, or None when nothing (readable) says so."""
    try:
        record = json.loads(_source_file(part).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_source(part: Path, url: str, total: int | None, headers) -> None:
    record = {"url": _url_id(url), "size": total, "etag": headers.get("ETag"),
              "last_modified": headers.get("Last-Modified")}
    _source_file(part).write_text(json.dumps(record))


def _fetch(url: str, part: Path, size: int | None, timeout: float, name: str) -> None:
    """One attempt: append to ``part`` from where it ends. Raises on any interruption."""
    start = part.stat().st_size if part.exists() else 0
    if size is not None and start == size:
        return  # a previous attempt got everything; verification decides
    if size is not None and start > size:
        part.unlink()
        start = 0
    headers = {"User-Agent": USER_AGENT}
    record = _read_source(part) if start else None
    if start:
        headers["Range"] = f"bytes={start}-"
        # The rest of the same file, or all of it if it changed since (the server answers 200).
        validator = record and (record.get("etag") or record.get("last_modified"))
        if validator:
            headers["If-Range"] = validator
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:
            # Range not satisfiable: the partial is already whole (or longer
            # than the file); let verification judge, or restart if unknown.
            if size is None:
                return
            part.unlink()
            raise _Dropped("server refused the range; restarting") from None
        raise
    with resp:
        if start and resp.status != 206:
            log.info("%s: server ignored the range request; restarting from byte 0", name)
            start = 0
        elif start:
            # A 206 must continue exactly where the partial file ends, in a file of the recorded size;
            # other bytes appended here would make a file of the right kind and the wrong content.
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", "").strip())
            recorded = record.get("size") if record else None
            if not m or int(m.group(1)) != start or (recorded and m.group(3) != str(recorded)):
                part.unlink(missing_ok=True)
                raise _Dropped(f"server answered the range request from byte {start} with "
                               f"{resp.headers.get('Content-Range')!r}; restarting from byte 0")
        length = resp.headers.get("Content-Length")
        remaining = int(length) if length is not None else None
        total = start + remaining if remaining is not None else size
        if size is not None and total is not None and total != size:
            part.unlink(missing_ok=True)  # not the file we expect: do not resume it later
            raise UserError(f"{name}: size mismatch (expected {size} bytes, server announces {total})")
        if not start:
            _write_source(part, url, total, resp.headers)
        mode = "ab" if start else "wb"
        with open(part, mode) as f, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
            desc=Path(name).name, mininterval=1.0, leave=False,
        ) as bar:
            got = 0
            while True:
                try:
                    block = resp.read(CHUNK)
                except (http.client.IncompleteRead, ConnectionError, socket.timeout, TimeoutError) as e:
                    raise _Dropped(f"connection dropped after {start + got} bytes ({type(e).__name__})") from None
                if not block:
                    break
                f.write(block)
                got += len(block)
                bar.update(len(block))
            f.flush()
            os.fsync(f.fileno())
    # http.client returns b"" at EOF even when fewer bytes than Content-Length
    # arrived, so a dropped connection is detected here, not by an exception.
    if remaining is not None and got < remaining:
        raise _Dropped(f"connection dropped after {start + got} of {total} bytes")


# --- safe archives -------------------------------------------------------------


def check_member_name(archive: str | os.PathLike, name: str) -> None:
    """Refuse member names that are absolute or climb out of the extraction folder."""
    posix = name.replace("\\", "/")
    if not posix or posix.startswith("/") or (posix[:1].isalpha() and posix[1:2] == ":"):  # "/x", "C:x"
        raise UserError(f"{archive}: refusing archive member {name!r} (absolute path)")
    if ".." in PurePosixPath(posix).parts:
        raise UserError(f"{archive}: refusing archive member {name!r} (path contains '..')")


def _zip_is_link(info: zipfile.ZipInfo) -> bool:
    # Unix mode bits live in the high 16 bits of external_attr (zip -y symlinks).
    return stat.S_ISLNK(info.external_attr >> 16)


def open_zip(path: str | os.PathLike) -> zipfile.ZipFile:
    """Open a zip for reading after checking every member name and type."""
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise UserError(f"{path}: archive not found") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{path}: not a readable zip archive ({e})") from None
    try:
        for info in zf.infolist():
            check_member_name(path, info.filename)
            if _zip_is_link(info):
                raise UserError(f"{path}: refusing archive member {info.filename!r} (symbolic link)")
    except BaseException:
        zf.close()
        raise
    return zf


def open_tar(path: str | os.PathLike) -> tarfile.TarFile:
    """Open a tar (any compression) after checking every member name and type."""
    try:
        tf = tarfile.open(path)
        members = tf.getmembers()  # reads the whole index: also catches truncation
    except FileNotFoundError:
        raise UserError(f"{path}: archive not found") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{path}: not a readable tar archive ({e})") from None
    try:
        for m in members:
            check_member_name(path, m.name)
            if m.issym() or m.islnk():
                raise UserError(f"{path}: refusing archive member {m.name!r} (link to {m.linkname!r})")
            if not (m.isfile() or m.isdir()):
                raise UserError(f"{path}: refusing archive member {m.name!r} (not a regular file or folder)")
    except BaseException:
        tf.close()
        raise
    return tf


# An archive may declare at most this much content, and at most this many times its own size:
# a "zip bomb" (200 MB of zeros in a 200 KB archive) is refused before a byte is written.
MAX_EXTRACT_BYTES = 8 << 30
MAX_EXPANSION = 100


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike, *, max_bytes: int = MAX_EXTRACT_BYTES,
                 max_expansion: float = MAX_EXPANSION) -> list[Path]:
    """Extract a zip or tar archive into ``dest``; return the files written.

    All members are checked before the first byte is written, so a refused
    archive leaves nothing behind: names (absolute, ``..``, links), and the
    total size they declare (``max_bytes``, and ``max_expansion`` times the
    archive's size). Members are written into a temporary folder inside
    ``dest`` and moved into place only when every one extracted (a member
    with a bad CRC leaves no partial file). Only regular files and folders are
    created (no modes, owners or links are taken from the archive).
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()

    def target(base: Path, name: str) -> Path:
        t = (base / name).resolve()
        if t != base and base not in t.parents:  # belt and braces after check_member_name
            raise UserError(f"{archive}: refusing archive member {name!r} (escapes the folder)")
        return t

    def check_size(declared: int) -> None:
        size = archive.stat().st_size
        if declared > max_bytes or (declared > (1 << 20) and declared > max_expansion * size):
            raise UserError(f"{archive}: refusing to extract {declared} bytes from a {size}-byte archive "
                            f"(limit {max_bytes} bytes, {max_expansion:g}x the archive)")

    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    written: list[Path] = []
    try:
        # One loop for both kinds: each member as (name, is a folder, declared size, opener).
        if zipfile.is_zipfile(archive):
            arc = open_zip(archive)
            members = [(i.filename, i.is_dir(), i.file_size, functools.partial(arc.open, i)) for i in arc.infolist()]
        else:
            arc = open_tar(archive)
            members = [(m.name, m.isdir(), m.size, functools.partial(arc.extractfile, m)) for m in arc.getmembers()]
        with arc:
            check_size(sum(size for _, _, size, _ in members))
            for name, is_dir, _, open_member in members:
                t = target(tmp, name)
                if is_dir:
                    t.mkdir(parents=True, exist_ok=True)
                    continue
                t.parent.mkdir(parents=True, exist_ok=True)
                # A zip member reads at most its declared size and checks its CRC.
                with open_member() as src, open(t, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
                written.append(t)
        # Everything extracted: move the top-level entries into place.
        for entry in sorted(tmp.iterdir()):
            final = root / entry.name
            if final.is_dir() and entry.is_dir():
                shutil.copytree(entry, final, dirs_exist_ok=True)
            else:
                if final.is_dir():
                    shutil.rmtree(final)
                os.replace(entry, final)
        return [root / w.relative_to(tmp) for w in written]
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise UserError(f"{archive}: corrupt or truncated archive ({type(e).__name__}: {e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
