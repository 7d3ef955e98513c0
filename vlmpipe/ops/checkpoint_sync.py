"""Checkpoints that outlive the machine: ``checkpoints.remote`` in params.yaml.

On a spot instance a stage can lose its machine mid-run; ``dvc push`` only stores checkpoints once a
stage has ended. With ``checkpoints.remote`` set, each training stage also keeps its newest checkpoint
on S3 as training goes:

- at the start, when the stage's checkpoint folder holds no checkpoint, the newest complete one on the
  remote is downloaded into it; the loop's own resume (identity check and all) takes it from there;
- every checkpoint the loop writes is uploaded under ``<remote>/<folder name>/step_XXXXXXXX/`` (newest
  first: one finished while another uploads waits, and older ones are skipped), its ``identity.json``
  last, so a remote step holding ``identity.json`` is complete; the remote steps before it are then
  deleted, as the loop deletes its local ones;
- at the end the stage waits for the last upload, or logs one warning line saying it did not get there.

A stage's checkpoint folders are its ``persist: true`` outputs in dvc.yaml (``models/checkpoints/<model>``).
The loop writes a checkpoint as one rename of a finished folder (``vlmpipe/loop/train.py``), so a
``step_*`` folder that exists is complete: the helper watches the folders (twice a second) and the loop
knows nothing of it. All the network work happens in a helper process (this module, run with ``-m``),
never in the training process: boto and aiohttp draw from Python's global ``random`` (retry jitter,
credential refresh, connection queues), and a checkpoint records that generator's state; in a process
of its own nothing the network does can reach what training computes or writes. Only rank 0 starts it.

The remote: ``s3://bucket/prefix`` (credentials, region and endpoint from the usual AWS places:
``AWS_*`` variables, ``AWS_ENDPOINT_URL``, ``~/.aws``, an instance role), or ``dvc``: the DVC default
remote's bucket, under ``<its url>/checkpoints/``, with its endpoint and credentials from DVC's
config (``.dvc/config`` and ``config.local``), read the way DVC reads them. No credential is ever put in
a log line or an error message.
"""
from __future__ import annotations

import logging
import os
import re
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from vlmpipe.core.errors import UserError, one_line, setup_logging
from vlmpipe.core.io import atomic_path
from vlmpipe.core.params import check

log = logging.getLogger("vlmpipe.ops.checkpoint_sync")  # the same name when run with -m

KEY = "checkpoints.remote"
MARKER = "identity.json"  # uploaded last: a remote step folder that holds it is complete
STEP = re.compile(r"step_\d{8}")
POLL_S = 0.5
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")


def _scrub(text: str) -> str:
    """``text`` with any ``user:password@`` in a URL removed."""
    return re.sub(r"//[^/@\s]*@", "//", text)


def remote_problem(value: str) -> str | None:
    """Why ``value`` is not a ``checkpoints.remote`` (None when it is one)."""
    if value in ("", "dvc"):
        return None
    scheme, sep, rest = value.partition("://")
    if not sep:
        return f"must be '' (off), 'dvc' (the DVC default remote's bucket) or s3://bucket/prefix, got {_scrub(value)!r}"
    if scheme != "s3":
        return f"only S3 is supported (s3://bucket/prefix), got a {scheme[:20]}:// URL"
    bucket = rest.split("/", 1)[0]
    if "@" in bucket or ":" in bucket:
        return ("put no credentials in the URL: they come from AWS_* variables, ~/.aws or the DVC remote's "
                "config (use 'dvc')")
    if not _BUCKET.fullmatch(bucket) or any(c.isspace() or c in "?#\\" for c in rest):
        return f"{_scrub(value)!r} is not s3://bucket/prefix (bucket names are 3-63 of a-z 0-9 . -)"
    return None


@dataclass
class CheckpointsParams:
    """Where the training stages also keep their checkpoints (no stage lists it: changing it reruns nothing)."""

    # "" (off), "dvc" (the DVC default remote's bucket, under <its url>/checkpoints) or s3://bucket/prefix.
    remote: str = ""

    def validate(self, key: str) -> None:
        why = remote_problem(self.remote)
        check(why is None, f"{key}.remote", why or "")


def checkpoint_dirs(stage: str, dvc_yaml: Path = Path("dvc.yaml")) -> list[Path]:
    """The checkpoint folders of ``stage``: its ``persist: true`` outputs in ``dvc_yaml``."""
    try:
        spec = (yaml.safe_load(dvc_yaml.read_text()) or {})["stages"][stage]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return []
    return [Path(next(iter(o))) for o in spec.get("outs") or []
            if isinstance(o, dict) and (next(iter(o.values())) or {}).get("persist")]


def local_steps(ckpt_dir: Path) -> list[Path]:
    """The complete checkpoints in ``ckpt_dir``, oldest first (the loop's own test: ``state.pt`` is there)."""
    return sorted(p for p in ckpt_dir.glob("step_*") if STEP.fullmatch(p.name) and (p / "state.pt").exists())


# ----------------------------------------------------------------- the stage's side (no network here)


class Sync:
    """The helper process of one stage (on rank 0; ``proc`` is None on the others)."""

    def __init__(self, proc: subprocess.Popen | None) -> None:
        self.proc = proc


def start(stage: str, params: CheckpointsParams, *, main: bool) -> Sync | None:
    """Start keeping ``stage``'s checkpoints on ``params.remote`` (None: off, or a stage without checkpoints).

    Returns once the remote answered (a ``UserError`` naming ``checkpoints.remote`` when it cannot be used)
    and, where the checkpoint folder was empty, the newest remote checkpoint is in it. Every rank calls it.
    """
    dirs = checkpoint_dirs(stage) if params.remote else []
    if not dirs:
        return None
    proc = None
    if main:
        # The helper imports this very vlmpipe, wherever the stage's was imported from.
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen([sys.executable, "-m", "vlmpipe.ops.checkpoint_sync", params.remote, *map(str, dirs)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        first = proc.stdout.readline().decode("utf-8", "replace").strip()
        if first != "ready":
            proc.stdin.close()
            proc.wait()
            raise UserError(first.partition(" ")[2] or f"{KEY}: the checkpoint upload helper stopped "
                            f"(exit code {proc.returncode}); its error is above")
    from vlmpipe.core.runtime import barrier  # here: it imports torch, which the helper has no use for

    barrier()  # the other ranks resume from what rank 0 downloaded
    return Sync(proc)


def finish(sync: Sync | None) -> None:
    """Wait for the last checkpoint to be uploaded (the helper logs one warning line if it could not be)."""
    if sync is None or sync.proc is None:
        return
    proc, sync.proc = sync.proc, None
    try:  # a line, not just EOF: forked DataLoader workers may still hold the pipe open
        proc.stdin.write(b"finish\n")
        proc.stdin.close()
    except OSError:  # the helper is gone already (Ctrl-C reached it too)
        pass
    rc = proc.wait()
    proc.stdout.close()
    if rc not in (0, 1, 130, -2):  # 1: it said why; 130 / SIGINT: Ctrl-C
        log.warning("%s: the checkpoint upload helper stopped with exit code %d; the last checkpoint may not "
                    "be on the remote", KEY, rc)


# ----------------------------------------------------------------- the helper process (all the network)


class Remote:
    """``checkpoints.remote`` resolved: an s3fs filesystem and the ``bucket/prefix`` the folders go under."""

    def __init__(self, value: str) -> None:
        import dvc_s3
        import s3fs

        if value == "dvc":
            conf, self.root = _dvc_default_remote()
        else:
            conf, self.root = {}, value[len("s3://"):].strip("/")
        self.secrets = [str(v) for k, v in conf.items() if k in ("access_key_id", "secret_access_key", "session_token")
                        and v]
        self.secrets += [os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
                         if os.environ.get(k)]
        try:
            args = dvc_s3.S3FileSystem(**conf).fs_args  # DVC's translation of its remote config (profile, keys, ...)
        except Exception as e:  # noqa: BLE001 - DVC's ConfigError and friends
            raise UserError(f"{KEY}: the DVC remote's S3 settings cannot be used ({self.reason(e)})") from None
        cfg = dict(args.get("config_kwargs") or {})
        cfg.setdefault("connect_timeout", 10)
        cfg.setdefault("read_timeout", 120)
        cfg["retries"] = {"max_attempts": 3, "mode": "standard"}
        self.fs = s3fs.S3FileSystem(**{**args, "config_kwargs": cfg, "use_listings_cache": False})

    def url(self, *parts: str) -> str:
        return "s3://" + "/".join([self.root, *parts])

    def reason(self, e: BaseException) -> str:
        """One line on what went wrong, with no credential in it."""
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        for s in self.secrets if hasattr(self, "secrets") else ():
            text = text.replace(s, "***")
        return one_line(_scrub(f"{type(e).__name__}: {text}" if text else type(e).__name__))[:300]

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def steps(self, folder: str) -> list[str]:
        """The step folders under ``folder`` on the remote, oldest first (complete or not)."""
        try:
            found = self.fs.ls(self._path(folder), detail=False)
        except FileNotFoundError:
            return []
        return sorted(n for n in (p.rstrip("/").rsplit("/", 1)[-1] for p in found) if STEP.fullmatch(n))

    def probe(self, folder: str) -> None:
        """Fail fast, one line, when the remote cannot be listed or written."""
        check_key = self._path(folder, ".vlmpipe-write-check")
        try:
            self.fs.pipe_file(check_key, b"")
            self.fs.rm_file(check_key)
            self.steps(folder)
        except Exception as e:  # noqa: BLE001 - permission, no bucket, no endpoint, ...
            hint = ""
            if isinstance(e, PermissionError):
                hint = " (check the credentials: AWS_* variables, ~/.aws, or the DVC remote's config)"
            raise UserError(f"{KEY}: cannot write to {self.url(folder)}: {self.reason(e)}{hint}") from None

    def restore(self, ckpt_dir: Path) -> str | None:
        """Download the newest complete remote checkpoint into an empty ``ckpt_dir``; its step name, or None."""
        if local_steps(ckpt_dir):
            return None
        folder = ckpt_dir.name
        try:
            for step in reversed(self.steps(folder)):
                if not self.fs.exists(self._path(folder, step, MARKER)):
                    continue  # an upload cut short
                t0, files = time.perf_counter(), self.fs.ls(self._path(folder, step), detail=True)
                with atomic_path(ckpt_dir / step) as tmp:  # a kill mid-download leaves only a hidden temp dir
                    tmp.mkdir()
                    for f in files:
                        self.fs.get_file(f["name"], str(tmp / f["name"].rsplit("/", 1)[-1]))
                log.info("%s: %s held no checkpoint; downloaded %s from %s (%.1f MB in %.1f s): resuming from it",
                         KEY, ckpt_dir, step, self.url(folder, step), sum(f["size"] for f in files) / 1e6,
                         time.perf_counter() - t0)
                return step
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{KEY}: cannot download the newest checkpoint from {self.url(folder)}: "
                            f"{self.reason(e)}") from None
        return None

    def upload(self, step_dir: Path) -> bool:
        """``step_dir`` onto the remote, marker last, then the other remote steps deleted. False when the
        folder vanished meanwhile (the loop wrote a newer one and deleted it): nothing to do."""
        folder, step = step_dir.parent.name, step_dir.name
        try:
            files = sorted((p for p in step_dir.iterdir() if p.is_file()), key=lambda p: (p.name == MARKER, p.name))
            marker = (step_dir / MARKER).read_bytes()
        except FileNotFoundError:
            return False
        if not self._holds(folder, step, files, marker):
            t0 = time.perf_counter()
            try:
                for f in files:
                    self.fs.put_file(str(f), self._path(folder, step, f.name))
            except FileNotFoundError:
                if not step_dir.exists():
                    return False
                raise
            log.info("%s: %s uploaded to %s (%.1f MB in %.1f s)", KEY, step_dir, self.url(folder, step),
                     sum(f.stat().st_size for f in files if f.exists()) / 1e6, time.perf_counter() - t0)
        for old in self.steps(folder):
            if old != step:
                self.fs.rm(self._path(folder, old), recursive=True)
        return True

    def _holds(self, folder: str, step: str, files: list[Path], marker: bytes) -> bool:
        """The remote has this very checkpoint already (the one downloaded at the start, say)."""
        try:
            if self.fs.cat_file(self._path(folder, step, MARKER)) != marker:
                return False
            sizes = {i["name"].rsplit("/", 1)[-1]: i["size"] for i in self.fs.ls(self._path(folder, step), detail=True)}
        except FileNotFoundError:
            return False
        return all(sizes.get(f.name) == f.stat().st_size for f in files)


def _dvc_default_remote() -> tuple[dict, str]:
    """(the DVC default remote's config as DVC hands it to its S3 filesystem, ``bucket/prefix/checkpoints``)."""
    from dvc.config import Config
    from dvc.fs import get_cloud_fs

    try:
        config = Config.from_cwd()
        name = config["core"].get("remote")
        if not name:
            raise UserError(f"{KEY}: 'dvc' needs a default DVC remote (`dvc remote add -d NAME s3://...`); "
                            "the DVC config names none")
        cls, conf, path = get_cloud_fs(config, name=name)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - DVC's config errors
        raise UserError(f"{KEY}: cannot read the DVC default remote ({type(e).__name__}: "
                        f"{one_line(_scrub(str(e)))[:200]})") from None
    if cls.protocol != "s3":
        raise UserError(f"{KEY}: 'dvc' needs the DVC default remote on S3; {name!r} is a {cls.protocol} remote "
                        "(set an s3:// URL instead)")
    return conf, path.strip("/") + "/checkpoints"


class _Watcher:
    """Uploads the newest local checkpoint of each folder whenever it changes; warns once on failure."""

    def __init__(self, remote: Remote, dirs: list[Path], done: dict[Path, str | None]) -> None:
        self.remote, self.dirs, self.done = remote, dirs, done  # done: the step on the remote, per folder
        self.failed: dict[Path, tuple[str, str]] = {}  # folder -> (step, why) of its last failed upload
        self.warned = False

    def tick(self, last_try: bool = False) -> None:
        for d in self.dirs:
            steps = local_steps(d)
            step = steps[-1] if steps else None
            if step is None or self.done.get(d) == step.name:
                continue
            if not last_try and self.failed.get(d, ("",))[0] == step.name:
                continue  # failed once: tried again when a newer one comes, and at the end
            try:
                if self.remote.upload(step):
                    self.done[d] = step.name
                    self.failed.pop(d, None)
            except Exception as e:  # noqa: BLE001 - network and server errors: training goes on
                why = self.remote.reason(e)
                self.failed[d] = (step.name, why)
                if not self.warned and not last_try:
                    self.warned = True
                    log.warning("%s: uploading %s failed (%s); training goes on, newer checkpoints will be tried",
                                KEY, step, why)

    def finish(self) -> int:
        self.tick(last_try=True)
        rc = 0
        for d in self.dirs:
            steps = local_steps(d)
            if steps and self.done.get(d) != steps[-1].name:
                rc = 1
                why = self.failed.get(d, ("", "not uploaded"))[1]
                log.warning("%s: the last checkpoint %s is not on %s (%s); it is kept here (`dvc push` stores it "
                            "too)", KEY, steps[-1], self.remote.url(d.name), why)
        return rc


def main(argv: list[str]) -> int:
    """The helper: ``python -m vlmpipe.ops.checkpoint_sync REMOTE CKPT_DIR...``. Says ``ready`` (or
    ``error <line>``) on stdout once the remote answered and the folders are restored, then uploads until
    its stdin says ``finish`` or closes (the stage ended, or died: killed alone, by the OOM killer say, its
    newest checkpoint is worth having); then it uploads the newest checkpoint and exits, 1 when that
    failed (it said why)."""
    setup_logging()
    logging.getLogger("aiobotocore").setLevel(logging.WARNING)  # "Found credentials in environment variables"
    proto, sys.stdout = sys.stdout, sys.stderr  # stdout is the stage's line to us; prints go to the log
    value, dirs = argv[0], [Path(d) for d in argv[1:]]
    try:
        remote = Remote(value)
        done = {}
        for d in dirs:
            remote.probe(d.name)
            done[d] = remote.restore(d)
    except UserError as e:
        proto.write(f"error {e}\n")
        proto.flush()
        return 2
    proto.write("ready\n")
    proto.flush()
    watcher = _Watcher(remote, dirs, done)
    while True:
        if select.select([sys.stdin], [], [], POLL_S)[0]:
            return watcher.finish()
        watcher.tick()


if __name__ == "__main__":
    try:
        raise SystemExit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # Ctrl-C reaches the stage's whole process group: the stage says it
        raise SystemExit(130) from None
