"""Shared fixtures: a loopback file server and tiny generated datasets."""
from __future__ import annotations

import contextlib
import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class FileServer:
    """Serves ``files`` (url path -> bytes) on 127.0.0.1, honouring ``Range: bytes=N-``.

    ``drop_once``: paths whose next response announces the full length but
    closes the connection halfway. ``drop_always``: paths that always do.
    ``ignore_range``: paths answered 200 with the whole file even for a Range
    request. ``log``: (path, Range header or None, status) of every request.
    """

    def __init__(self) -> None:
        # Each file is served with an ETag (its sha1), and a Range request whose If-Range names
        # another one is answered 200 with the whole file, as HTTP servers do.
        self.files: dict[str, bytes] = {}
        self.drop_once: set[str] = set()
        self.drop_always: set[str] = set()
        self.ignore_range: set[str] = set()
        # Paths answered 206 for a Range request but with the whole file from byte 0 (a broken proxy).
        self.wrong_range: set[str] = set()
        # Paths always answered with this HTTP status (e.g. 500).
        self.status: dict[str, int] = {}
        self.log: list[tuple[str, str | None, int]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                rng = self.headers.get("Range")
                data = server.files.get(path)
                if path in server.status:
                    server.log.append((path, rng, server.status[path]))
                    self.send_error(server.status[path])
                    return
                if data is None:
                    server.log.append((path, rng, 404))
                    self.send_error(404)
                    return
                start = 0
                etag = '"%s"' % hashlib.sha1(data).hexdigest()
                # The file changed since the partial download (If-Range names another ETag): whole.
                changed = self.headers.get("If-Range") not in (None, etag)
                if rng and path in server.wrong_range and not changed:
                    server.log.append((path, rng, 206))
                    self.send_response(206)
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("Content-Range", f"bytes 0-{len(data) - 1}/{len(data)}")
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if rng and path not in server.ignore_range and not changed:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        server.log.append((path, rng, 416))
                        self.send_error(416)
                        return
                status = 206 if start else 200
                body = data[start:]
                server.log.append((path, rng, status))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", etag)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if path in server.drop_always or path in server.drop_once:
                    server.drop_once.discard(path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:
                pass  # a client that hangs up mid-response (the tests' dropped downloads) is expected

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


# Fixtures that run a whole preset through `dvc repro` (minutes): every test using one is slow.
SLOW_FIXTURES = {"tiny_repo", "full_repo"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups off the items
def pytest_collection_modifyitems(config, items):
    """Marks the tests of a preset run slow, and groups tests for `pytest -n 2 --dist loadgroup` (the
    Makefile's): the tests of one preset run on the worker that built it, and each other module on one
    worker, so a session- or module-wide fixture is built once. The preset runs go first: they are the
    longest work, and the other worker takes the modules meanwhile."""
    def group(item) -> str:
        uses = sorted(SLOW_FIXTURES & set(getattr(item, "fixturenames", ())))
        return uses[0] if uses else item.nodeid.split("::")[0]
    for item in items:
        if group(item) in SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)
        item.add_marker(pytest.mark.xdist_group(group(item)))
    items.sort(key=lambda item: group(item) not in SLOW_FIXTURES)  # stable: file order within each part


@pytest.fixture(autouse=True, scope="session")
def _private_download_dir(tmp_path_factory):
    """Downloads (and their verification record) and the CPU peak in folders of this test session, never ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VLMPIPE_DOWNLOAD_DIR", str(tmp_path_factory.mktemp("downloads")))
    # The calibrated CPU peak too: a peak measured on a busy test machine must not become the user's.
    mp.setenv("VLMPIPE_PEAK_FILE", str(tmp_path_factory.mktemp("peak") / "cpu_peak.json"))
    yield
    mp.undo()


@contextlib.contextmanager
def serving():
    """A started FileServer, shut down on exit."""
    server = FileServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


@pytest.fixture
def file_server():
    with serving() as server:
        yield server


@pytest.fixture(scope="session")
def file_server_session():
    """One FileServer for the whole session (the full-preset rehearsal's archives)."""
    with serving() as server:
        yield server


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory):
    """A generated CIFAR-format folder: 20 train and 5 test images per class (seed 0)."""
    from vlmpipe.sources import cifar

    root = tmp_path_factory.mktemp("cifar")
    cifar.write_synthetic(root, train_per_class=20, test_per_class=5, seed=0)
    return root


@pytest.fixture(scope="session")
def qa_csv(tiny_cifar, tmp_path_factory):
    """A generated Q/A CSV for ``tiny_cifar`` (seed 7)."""
    from vlmpipe.sources import qa

    path = tmp_path_factory.mktemp("qa") / "cifar_qa.csv"
    qa.write_qa_csv(path, tiny_cifar, seed=7)
    return path


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory):
    """A generated and ingested COCO folder: 12 train and 6 val scenes at 64 px (seed 0)."""
    from vlmpipe.sources import coco
    from vlmpipe.sources.params import CocoParams

    root = tmp_path_factory.mktemp("coco") / "coco"
    coco.build(CocoParams(synthetic_train_images=12, synthetic_val_images=6, image_size=64), 0, root)
    return root


# --------------------------------------------------------------------------
# Tracking and storage (issue 7): a real MLflow server and the tiny-preset
# pipeline, built once per session in a temporary copy of the repository.
# Helpers live in tests/servers.py.

import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import servers  # noqa: E402  (tests/servers.py)

REPO_ROOT = Path(__file__).resolve().parents[1]

# The stages the `tiny_repo` fixture runs on presets/tiny.yaml.
#   None            -> `dvc repro` of the whole DAG (the goal, once every stage exists);
#   [names, ...]    -> `dvc repro <names>` (those stages and their upstream).
# Env VLMPIPE_TEST_TINY_STAGES overrides it: "all", or "download_coco,build_cifar_qa_csv".
TINY_DAG_STAGES: list[str] | None = None

# Fake credentials the tiny pipeline runs with: servers.FAKE_SECRETS.
FAKE_SECRETS = servers.FAKE_SECRETS


def tiny_dag_stages() -> list[str] | None:
    env = os.environ.get("VLMPIPE_TEST_TINY_STAGES")
    if env is not None:
        return None if env.strip() in ("", "all") else [s.strip() for s in env.split(",") if s.strip()]
    return TINY_DAG_STAGES


def copy_worktree(src: Path, dest: Path) -> None:
    """Copy what git would see in ``src`` (tracked + untracked, not ignored) to ``dest``."""
    out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=src,
                         capture_output=True, check=True).stdout
    for rel in sorted(set(filter(None, out.decode().split("\0")))):
        s = src / rel
        if s.is_file():  # skip files deleted in the working tree
            d = dest / rel
            d.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, d)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


@dataclass
class TinyRepo:
    """A git + DVC repository (a copy of this one, params = presets/tiny.yaml) after `dvc repro`."""

    path: Path
    stages: list[str]          # the stages that ran
    full_dag: bool             # True when the whole DAG ran
    commit: str                # the commit the pipeline ran on
    mlflow: "servers.MlflowServer"  # where the DAG's MLflow runs went
    build_s: float
    repro_output: str
    site_cache: Path
    base_env: dict = field(repr=False, default_factory=dict)

    @property
    def targets(self) -> list[str]:
        """Targets for `dvc pull/status/...`: none for the whole DAG, else the stages that ran
        (the others have no lock entry, so an untargeted pull or status would report them)."""
        return [] if self.full_dag else list(self.stages)

    def env(self, repo: Path | None = None, **extra: str) -> dict[str, str]:
        """Environment for commands in ``repo`` (default: this one): its own vlmpipe first,
        no tracking URI (default sqlite store in the repo) unless given in ``extra``."""
        return {**self.base_env, "PYTHONPATH": str(repo or self.path), **extra}

    def clone(self, dest: Path) -> Path:
        """A full copy (git history, DVC cache, outputs) that a test may change freely."""
        shutil.copytree(self.path, dest, symlinks=True, ignore=_ignore_dvc_tmp)
        return dest


def _ignore_dvc_tmp(directory: str, names: list[str]) -> list[str]:
    # .dvc/tmp holds locks and a state db keyed by inode: let each copy rebuild its own.
    return ["tmp"] if Path(directory).name == ".dvc" else []


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on a free 127.0.0.1 port (sqlite store, proxied artifacts)."""
    with servers.mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as srv:
        yield srv


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory, mlflow_server) -> TinyRepo:
    """The tiny-preset pipeline, run once per session with `dvc repro` in a temporary
    copy of the working tree (git init + commit there; outputs and lock committed
    after, as a user would). Its stages log to the session's `mlflow_server`, with
    FAKE_SECRETS in their environment. Tests that change the repository work on
    ``tiny_repo.clone(tmp_path / "repo")``."""
    base = tmp_path_factory.mktemp("tiny_repo")
    repo, site_cache = base / "repo", base / "dvc-site-cache"
    copy_worktree(REPO_ROOT, repo)
    shutil.copy2(repo / "presets" / "tiny.yaml", repo / "params.yaml")
    base_env = servers.clean_env(DVC_SITE_CACHE_DIR=str(site_cache), GIT_TERMINAL_PROMPT="0")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "tests@vlmpipe.invalid")
    git(repo, "config", "user.name", "vlmpipe tests")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "tiny preset")
    commit = git(repo, "rev-parse", "HEAD")

    targets = tiny_dag_stages()
    env = {**base_env, "PYTHONPATH": str(repo), "MLFLOW_TRACKING_URI": mlflow_server.uri, **FAKE_SECRETS}
    ran = stages_to_run(repo, env, targets)
    t0 = time.monotonic()
    p = servers.run(["dvc", "repro", *(targets or [])], cwd=repo, env=env, timeout=1200)
    build_s = time.monotonic() - t0
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "dvc repro (tiny preset)")
    return TinyRepo(repo, ran, targets is None, commit, mlflow_server, build_s, p.stdout + p.stderr, site_cache,
                    base_env)


def stages_to_run(repo: Path, env: dict, targets: list[str] | None) -> list[str]:
    """The stages `dvc repro [targets]` runs, in order (from `dvc repro --dry --force`)."""
    import re

    out = servers.run(["dvc", "repro", "--dry", "--force", *(targets or [])], cwd=repo, env=env).stdout
    return re.findall(r"Running stage '([^']+)'", out)
