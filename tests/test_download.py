"""The download helper against a loopback server, and safe archive handling."""
from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import zipfile

import pytest

from vlmpipe.core.download import download, open_tar, open_zip, safe_extract
from vlmpipe.core.errors import UserError

# Larger than the 1 MiB read size, so a drop happens mid-stream after real writes.
PAYLOAD = os.urandom(3 * (1 << 20) + 12345)
MD5 = hashlib.md5(PAYLOAD).hexdigest()
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


def _get(dest, server, path="/f.bin", **kw):
    kw.setdefault("backoff", 0.0)
    return download(server.url(path), dest, **kw)


def test_dropped_connection_resumes_to_identical_file(tmp_path, file_server):
    file_server.files["/f.bin"] = PAYLOAD
    file_server.drop_once.add("/f.bin")
    dest = _get(tmp_path / "f.bin", file_server, size=len(PAYLOAD), md5=MD5, sha256=SHA256)
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "f.bin.part").exists()
    (first, _, s1), (_, rng, s2) = file_server.log
    assert s1 == 200 and s2 == 206
    assert rng == f"bytes={len(PAYLOAD) // 2}-"  # resumed where the drop happened


def _interrupted(dest, server, path="/f.bin") -> int:
    """A download of ``path`` to ``dest`` cut halfway, as a run killed mid-download leaves it: the
    partial file and its record. Returns the partial's length; the server's log is cleared."""
    server.drop_always.add(path)
    with pytest.raises(UserError, match="rerun to resume"):
        _get(dest, server, path, retries=0)
    server.drop_always.discard(path)
    server.log.clear()
    part = dest.with_name(dest.name + ".part")
    assert part.exists() and dest.with_name(dest.name + ".part.source").exists()
    return part.stat().st_size


def test_existing_partial_is_resumed(tmp_path, file_server):
    file_server.files["/f.bin"] = PAYLOAD
    half = _interrupted(tmp_path / "f.bin", file_server)
    dest = _get(tmp_path / "f.bin", file_server, md5=MD5)
    assert dest.read_bytes() == PAYLOAD
    assert file_server.log == [("/f.bin", f"bytes={half}-", 206)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]  # the record went with the partial


def test_server_ignoring_range_restarts_from_zero(tmp_path, file_server):
    file_server.files["/f.bin"] = PAYLOAD
    half = _interrupted(tmp_path / "f.bin", file_server)
    file_server.ignore_range.add("/f.bin")
    dest = _get(tmp_path / "f.bin", file_server, md5=MD5)
    assert dest.read_bytes() == PAYLOAD
    assert file_server.log == [("/f.bin", f"bytes={half}-", 200)]


def test_a_partial_of_unknown_origin_is_discarded(tmp_path, file_server, caplog):
    """A `.part` nothing records the source of (another program's, an older version's, another
    mirror's) is never completed with this server's bytes: it is discarded with a warning."""
    file_server.files["/f.bin"] = PAYLOAD
    (tmp_path / "f.bin.part").write_bytes(os.urandom(1000))
    with caplog.at_level("WARNING"):
        dest = _get(tmp_path / "f.bin", file_server)  # no size or checksum to catch a splice
    assert dest.read_bytes() == PAYLOAD
    assert file_server.log == [("/f.bin", None, 200)]
    assert any("no record of where it came from" in r.getMessage() for r in caplog.records)


def test_a_partial_of_another_url_is_discarded(tmp_path, file_server):
    file_server.files["/old/f.bin"] = PAYLOAD[::-1]
    file_server.files["/new/f.bin"] = PAYLOAD
    _interrupted(tmp_path / "f.bin", file_server, "/old/f.bin")
    dest = _get(tmp_path / "f.bin", file_server, "/new/f.bin")
    assert dest.read_bytes() == PAYLOAD
    assert file_server.log == [("/new/f.bin", None, 200)]


def test_a_file_changed_on_the_server_since_the_partial_is_fetched_whole(tmp_path, file_server):
    """Resuming asks for the rest of the same file (If-Range, the ETag recorded with the partial): a
    file replaced on the server since is sent whole, not spliced onto the old half."""
    file_server.files["/f.bin"] = PAYLOAD[::-1]  # same size, other bytes
    half = _interrupted(tmp_path / "f.bin", file_server)
    file_server.files["/f.bin"] = PAYLOAD
    dest = _get(tmp_path / "f.bin", file_server)
    assert dest.read_bytes() == PAYLOAD
    assert file_server.log == [("/f.bin", f"bytes={half}-", 200)]


def test_checksum_mismatch_fails_and_leaves_nothing(tmp_path, file_server):
    file_server.files["/f.bin"] = PAYLOAD
    wrong = "0" * 32
    with pytest.raises(UserError) as e:
        _get(tmp_path / "f.bin", file_server, md5=wrong)
    msg = str(e.value)
    assert "f.bin" in msg and wrong in msg and MD5 in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # neither f.bin nor f.bin.part


def test_size_mismatch_fails_and_leaves_nothing(tmp_path, file_server):
    file_server.files["/f.bin"] = PAYLOAD
    with pytest.raises(UserError, match=rf"f\.bin: size mismatch \(expected {len(PAYLOAD) + 1} bytes"):
        _get(tmp_path / "f.bin", file_server, size=len(PAYLOAD) + 1)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_partial_is_caught_by_checksum(tmp_path, file_server):
    file_server.files["/f.bin"] = PAYLOAD
    half = _interrupted(tmp_path / "f.bin", file_server)
    (tmp_path / "f.bin.part").write_bytes(b"x" * half)  # damaged on disk since
    with pytest.raises(UserError, match="md5 mismatch"):
        _get(tmp_path / "f.bin", file_server, md5=MD5)
    assert list(tmp_path.iterdir()) == []
    assert _get(tmp_path / "f.bin", file_server, md5=MD5).read_bytes() == PAYLOAD  # the rerun starts clean


def test_verified_file_is_not_fetched_again(tmp_path, file_server):
    file_server.files["/f.bin"] = PAYLOAD
    _get(tmp_path / "f.bin", file_server, md5=MD5)
    _get(tmp_path / "f.bin", file_server, md5=MD5)
    assert len(file_server.log) == 1


def test_http_404_is_a_user_error(tmp_path, file_server):
    with pytest.raises(UserError, match=r"/missing\.bin: HTTP 404"):
        _get(tmp_path / "m.bin", file_server, path="/missing.bin")
    assert len(file_server.log) == 1  # a 4xx is not retried


def test_gives_up_after_retries(tmp_path, file_server):
    file_server.files["/f.bin"] = b"abcdefgh"
    file_server.drop_always.add("/f.bin")
    # Each attempt gets half of what is left, then 1 byte, then nothing: the
    # attempts without progress count towards the limit.
    with pytest.raises(UserError, match=r"download failed after 2 retries .*rerun to resume"):
        _get(tmp_path / "f.bin", file_server, retries=2)
    assert not (tmp_path / "f.bin").exists()


def test_a_placed_file_that_differs_is_kept_and_named(tmp_path, file_server):
    """A file already at the destination may be the user's own copy: never deleted, even when wrong."""
    file_server.files["/f.bin"] = PAYLOAD
    mine = tmp_path / "f.bin"
    mine.write_bytes(b"my own bytes")
    with pytest.raises(UserError) as e:
        _get(mine, file_server, md5=MD5, key="coco.url", hint="or set coco.verify: false")
    msg = str(e.value)
    assert msg.startswith("coco.url: ") and str(mine) in msg and "md5 mismatch" in msg and "move it away" in msg
    assert "coco.verify: false" in msg and "\n" not in msg
    assert mine.read_bytes() == b"my own bytes" and file_server.log == []


def test_unreachable_server_fails_at_once_with_where_to_put_the_file(tmp_path, monkeypatch):
    import servers

    slept = []
    monkeypatch.setattr("vlmpipe.core.download.time.sleep", slept.append)
    url = f"http://127.0.0.1:{servers.dead_port()}/zips/train2017.zip"
    with pytest.raises(UserError) as e:
        download(url, tmp_path / "train2017.zip", key="coco.url", hint=f"put train2017.zip in {tmp_path}")
    msg = str(e.value)
    assert msg.startswith(f"coco.url: {url}: cannot reach the server") and f"put train2017.zip in {tmp_path}" in msg
    assert slept == []  # no retries with backoff: nothing answers there
    assert list(tmp_path.iterdir()) == []


def test_a_range_answered_from_another_offset_is_never_appended(tmp_path, file_server):
    """No size known: a 206 whose Content-Range does not start where the partial ends restarts
    from byte 0 instead of appending (it used to give a longer file, logged as verified)."""
    file_server.files["/f.bin"] = PAYLOAD
    _interrupted(tmp_path / "f.bin", file_server)
    file_server.wrong_range.add("/f.bin")
    dest = _get(tmp_path / "f.bin", file_server)
    assert dest.read_bytes() == PAYLOAD
    assert [s for _, _, s in file_server.log] == [206, 200]


def test_credentials_in_a_url_are_not_echoed(tmp_path, file_server):
    url = file_server.url("/missing.bin").replace("http://", "http://user:s3cret@")
    with pytest.raises(UserError) as e:
        download(url, tmp_path / "m.bin")
    assert "s3cret" not in str(e.value) and "***@127.0.0.1" in str(e.value)


# --- archives --------------------------------------------------------------------


def _zip(path, members: dict[str, bytes], symlink: str | None = None):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize("name, why", [
    ("../evil.txt", "'..'"),
    ("ok/../../evil.txt", "'..'"),
    ("/abs/evil.txt", "absolute"),
])
def test_zip_unsafe_member_names_refused(tmp_path, name, why):
    z = _zip(tmp_path / "bad.zip", {"good.txt": b"ok", name: b"evil"})
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        safe_extract(z, out)
    assert str(z) in str(e.value) and repr(name) in str(e.value) and why in str(e.value)
    with pytest.raises(UserError):
        open_zip(z)
    # Checked before writing anything: not even the good member was extracted.
    assert not any(out.rglob("*")) and not (tmp_path / "evil.txt").exists()


def test_zip_symlink_member_refused(tmp_path):
    z = _zip(tmp_path / "link.zip", {"good.txt": b"ok"}, symlink="data/link")
    with pytest.raises(UserError, match=r"link\.zip: refusing archive member 'data/link' \(symbolic link\)"):
        safe_extract(z, tmp_path / "out")


def _tar(path, add):
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo("dir/good.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"ok"))
        add(tf)
    return path


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "dotdot", "absolute"])
def test_tar_unsafe_members_refused(tmp_path, kind):
    def add(tf):
        if kind in ("symlink", "hardlink"):
            info = tarfile.TarInfo("dir/link")
            info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            info.linkname = "/etc/passwd" if kind == "symlink" else "dir/good.txt"
            tf.addfile(info)
        else:
            info = tarfile.TarInfo("../evil.txt" if kind == "dotdot" else "/tmp/evil.txt")
            info.size = 4
            tf.addfile(info, io.BytesIO(b"evil"))

    t = _tar(tmp_path / "bad.tar.gz", add)
    with pytest.raises(UserError, match=r"bad\.tar\.gz: refusing archive member"):
        safe_extract(t, tmp_path / "out")
    with pytest.raises(UserError):
        open_tar(t)
    assert not any((tmp_path / "out").rglob("*"))


def test_safe_archives_extract(tmp_path):
    z = _zip(tmp_path / "good.zip", {"a/b.txt": b"hello", "c.txt": b"world"})
    written = safe_extract(z, tmp_path / "zout")
    assert sorted(p.relative_to(tmp_path / "zout").as_posix() for p in written) == ["a/b.txt", "c.txt"]
    assert (tmp_path / "zout/a/b.txt").read_bytes() == b"hello"
    t = _tar(tmp_path / "good.tar.gz", lambda tf: None)
    safe_extract(t, tmp_path / "tout")
    assert (tmp_path / "tout/dir/good.txt").read_bytes() == b"ok"


def test_truncated_archive_is_a_user_error(tmp_path):
    z = _zip(tmp_path / "good.zip", {"a.txt": os.urandom(5000)})
    cut = tmp_path / "cut.zip"
    cut.write_bytes(z.read_bytes()[:3000])
    with pytest.raises(UserError, match=r"cut\.zip: not a readable zip archive"):
        open_zip(cut)
    t = _tar(tmp_path / "good.tar.gz", lambda tf: None)
    tcut = tmp_path / "cut.tar.gz"
    tcut.write_bytes(t.read_bytes()[:40])
    with pytest.raises(UserError, match=r"cut\.tar\.gz"):
        safe_extract(tcut, tmp_path / "out")


def test_zip_bomb_is_refused_before_writing(tmp_path):
    """200 MB of zeros in a ~200 KB zip (it used to extract without limit)."""
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("zeros.bin", "w") as f:
            for _ in range(200):
                f.write(b"\0" * (1 << 20))
    assert bomb.stat().st_size < 400_000
    with pytest.raises(UserError, match=r"bomb\.zip: refusing to extract 209715200 bytes from a \d+-byte archive"):
        safe_extract(bomb, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    # ... and a tarball of the same kind, against an explicit cap.
    tgz = tmp_path / "big.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        info = tarfile.TarInfo("zeros.bin")
        info.size = 50 << 20
        tf.addfile(info, io.BytesIO(b"\0" * info.size))
    with pytest.raises(UserError, match="refusing to extract 52428800 bytes"):
        safe_extract(tgz, tmp_path / "out2")
    assert list((tmp_path / "out2").iterdir()) == []


def test_bad_crc_leaves_no_partial_file(tmp_path):
    good = _zip(tmp_path / "g.zip", {"a.txt": b"first member", "b.txt": os.urandom(4000)})
    data = bytearray(good.read_bytes())
    i = data.index(b"first member")
    data[i] ^= 0xFF  # the stored bytes no longer match the CRC
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"bad\.zip: corrupt or truncated archive \(BadZipFile: Bad CRC-32"):
        safe_extract(bad, tmp_path / "out")
    assert list((tmp_path / "out").rglob("*")) == []
