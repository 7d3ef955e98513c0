"""MLflow tracking that never takes a training run down with it.

Every stage execution is one MLflow run in the ``vlmpipe`` experiment::

    with stage_run("train_siglip", flatten(to_dict(p.siglip))) as run:
        run.log_metrics({"loss": 0.7}, step=10)      # per step
        run.log_metrics({"zero_shot_acc": 0.93})     # final
        run.log_artifact("reports/siglip/train_curve.csv")

Tags: ``stage``, ``git_commit`` (+ ``git_dirty``: the code differs from that
commit; ``dvc.lock``, ``.dvc`` files, ``.gitignore`` files, ``params.yaml`` and
the outputs dvc.yaml declares are left out: DVC writes them between stages, and
the params are logged) and,
under ``dvc exp run``, ``dvc_experiment`` (the experiment's name) and
``dvc_baseline_rev``. DVC exports ``DVC_EXP_NAME``, ``DVC_EXP_BASELINE_REV`` and
``DVC_ROOT`` to every stage command it runs for an experiment (workspace,
``--temp`` and queued runs alike, verified with dvc 3.67).

One parent run per DVC command: the stages that one ``dvc repro`` or ``dvc exp
run`` (a queued experiment's run too) executes are nested under one run named
after it (``dvc repro`` / the experiment's name), found by the ``dvc`` process
that started them. A stage run by hand has no parent.

Metric names carry the model they measure (``vqa/accuracy``,
``chat/final/exact_match``, ``siglip/train/loss``) when the stage names one, so
charts of different models never share a key. The experiment is tagged as model
training, so the MLflow UI opens it on its runs.

Where runs go: ``MLFLOW_TRACKING_URI`` if set (e.g. an MLflow server), else
``sqlite:///mlflow.db`` in the repository root (``$DVC_ROOT``, which points at
the user's repository even when DVC runs the stage in a temporary experiment
workspace; else the current directory), with artifacts in ``mlartifacts/``
beside it. MLflow records artifact locations as absolute paths: when the
checkout has been moved or copied, the first run re-points the store's
locations at the ``mlartifacts/`` beside the database (one logged line).
``VLMPIPE_TRACKING=off`` switches tracking off.

Failure policy: if the tracking store is unreachable or refuses a call, ONE
warning is logged and tracking is off for the rest of the process; the stage
still completes and its DVC metrics and plots are still written. A dead server
costs a TCP connect (refused at once, or a few seconds' timeout), not
MLflow's default minutes of retries: unless the user set them, the HTTP
client's retries are cut to ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=2``,
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1``, ``MLFLOW_HTTP_REQUEST_TIMEOUT=10``.

Secrets: nothing that looks like a credential reaches MLflow or the log.
Values under secret-looking keys become ``***``; the values of secret-looking
environment variables (``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``MLFLOW_TRACKING_PASSWORD``, ``HF_TOKEN`` ...) are masked wherever they occur
in a param, tag or warning; ``user:password@`` is stripped from URLs. MLflow's
usage telemetry is off unless ``MLFLOW_DISABLE_TELEMETRY`` is set explicitly.
"""
from __future__ import annotations

import contextlib
import getpass
import logging
import math
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

log = logging.getLogger(__name__)

EXPERIMENT = "vlmpipe"
# What the MLflow UI opens an experiment on: its runs (model training), not the GenAI traces page.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# The tag that names the DVC command a parent run stands for.
INVOCATION_TAG = "dvc_invocation"
DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
# Kept for callers that want the documented default spelled out.
DEFAULT_URI = f"sqlite:///{DEFAULT_DB}"

# Short HTTP retries (see the module docstring); the user's own settings win.
HTTP_CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
PROBE_TIMEOUT_S = 5.0

# Keys whose values must never reach MLflow (params, tags or logs).
_SECRET_RE = re.compile(
    r"(secret|token|password|passwd|credential|access_key|accesskey|api_?key|auth|private_key|session_key)",
    re.I,
)
# scheme://user:password@host or scheme://token@host  ->  scheme://***@host. The
# password may hold an unencoded "/" (AWS secrets do); "s3://bucket/key@v2" is left alone.
_URL_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?:[^\s@/:]*:[^\s@]*|[^\s@/:]+)@")
# Env values shorter than this are not masked inside other strings (too many
# false hits: "1", "true" ...); a key that looks secret is masked whatever its value.
_MIN_SECRET_LEN = 6
_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
_MAX_TAG_LEN = 5000


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_RE.search(str(key)))


def _secret_env_values() -> list[str]:
    """Values of secret-looking environment variables, and their long pieces (an error
    message may quote part of a value cut at a "/" or ":"), longest first."""
    vals: set[str] = set()
    for k, v in os.environ.items():
        if is_secret_key(k) and v and len(v) >= _MIN_SECRET_LEN:
            vals.add(v)
            vals.update(piece for piece in re.split(r"[/+:=@,;\s]", v) if len(piece) >= 8)
    return sorted(vals, key=len, reverse=True)


def scrub(text: Any) -> str:
    """``text`` as a string with credentials masked (env secret values, URL passwords)."""
    s = str(text)
    for v in _secret_env_values():
        if v in s:
            s = s.replace(v, "***")
    return _URL_USERINFO_RE.sub(r"\g<scheme>***@", s)


def redact(d: Mapping[str, Any]) -> dict[str, Any]:
    """Mask values under secret-looking keys and credentials inside the other values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if is_secret_key(k):
            out[k] = "***"
        elif isinstance(v, str):
            out[k] = scrub(v)
        elif isinstance(v, (list, tuple)):
            out[k] = scrub(v) if any(isinstance(x, str) for x in v) else v
        else:
            out[k] = v
    return out


def repo_root() -> Path:
    """The user's repository: ``$DVC_ROOT`` under DVC (also in temp exp workspaces), else cwd."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` or the default store; a relative sqlite path is taken from the repo root.

    DVC runs ``--temp`` and queued experiments in a temporary copy of the
    repository: a path relative to the working directory would put the runs
    in a directory that is deleted afterwards.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    db = _sqlite_path(uri)
    if db is not None and not db.is_absolute():
        return f"sqlite:///{repo_root() / db}"
    return uri


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URI (relative or absolute), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///"):].split("?", 1)[0]
    if not rest or rest == ":memory:":
        return None
    return Path(rest)


@contextlib.contextmanager
def process_store(uri: str) -> Iterator[None]:
    """MLflow resolves a registered version's ``models:/`` source through the process's default store,
    not the client's (mlflow 3.17, SqlAlchemyStore.create_model_version): make that ``uri`` meanwhile,
    not a default store in whatever directory the stage runs in (a temporary experiment workspace)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


# MLflow's columns that hold an artifact location (mlflow 3.17's sqlite schema).
_LOCATIONS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
              ("logged_models", "artifact_location"), ("model_versions", "storage_location"))


def relocate(db: Path) -> None:
    """Point the artifact locations of the store ``db`` at the ``mlartifacts/`` beside it, when they name
    the one beside where the database used to be: a moved or copied checkout keeps its runs and models.
    Stores of another layout (a location set by the user, a server) are left as they are."""
    if not db.is_file():
        return
    new_root = db.resolve().parent
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as con:
        try:
            row = con.execute("SELECT artifact_location FROM experiments WHERE name = ?", (EXPERIMENT,)).fetchone()
        except sqlite3.DatabaseError:  # not an MLflow store yet: MLflow creates its tables
            return
        if not row or not str(row[0]).startswith("file://"):
            return
        old_art = Path(urllib.parse.unquote(urllib.parse.urlparse(row[0]).path))
        if old_art.name != DEFAULT_ARTIFACTS or old_art.parent == new_root:
            return
        old_root = old_art.parent
        prefixes = ((old_root.as_uri() + "/", new_root.as_uri() + "/"), (f"{old_root}/", f"{new_root}/"))
        with con:  # one transaction: every location or none
            for table, col in _LOCATIONS:
                for rowid, value in con.execute(f"SELECT rowid, {col} FROM {table}").fetchall():
                    for old, new in prefixes:
                        if isinstance(value, str) and value.startswith(old):
                            con.execute(f"UPDATE {table} SET {col} = ? WHERE rowid = ?",
                                        (new + value[len(old):], rowid))
                            break
    log.info("MLflow store %s: artifact locations moved from %s to %s (the checkout moved)", db, old_root, new_root)


def tracking_enabled() -> bool:
    return os.environ.get("VLMPIPE_TRACKING", "on").strip().lower() not in ("0", "off", "false", "no")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_commit() -> str | None:
    return _git("rev-parse", "HEAD") or None


# Files DVC writes between stages (dvc.lock, .gitignore) or under `dvc exp run -S` (params.yaml, whose
# values are logged as the run's params): a change to them is no change to the code.
_DVC_WRITTEN = re.compile(r"(^|/)(dvc\.lock|params\.yaml|\.gitignore|[^/]*\.dvc)$")


def _dvc_outputs() -> list[str]:
    """The outputs dvc.yaml declares (in the working directory): those kept in git (``cache: false``)
    change, or are removed, whenever DVC runs their stage."""
    try:
        import yaml

        stages = yaml.safe_load(Path("dvc.yaml").read_text()).get("stages", {})
    except Exception:  # noqa: BLE001 - no dvc.yaml here, or not one to read: no outputs known
        return []
    return [(next(iter(o)) if isinstance(o, dict) else str(o)).rstrip("/") for s in stages.values()
            if isinstance(s, dict) for kind in ("outs", "metrics", "plots") for o in s.get(kind) or []]


def _git_dirty() -> bool | None:
    changed = _git("diff", "--name-only", "HEAD")  # tracked files, staged or not
    if changed is None:
        return None
    outs = _dvc_outputs()
    return any(not _DVC_WRITTEN.search(p) and not any(p == o or p.startswith(o + "/") for o in outs)
               for p in changed.splitlines() if p)


def dvc_invocation() -> str | None:
    """The ``dvc`` process running this stage (``dvc repro``, ``dvc exp run``, a queued experiment's
    run) as ``pid-starttime``, or None when no DVC command started it. Read from /proc: DVC exports
    no id of its own, and every stage of one command has that process as its nearest ``dvc`` ancestor.
    """
    if not os.environ.get("DVC_ROOT"):  # DVC sets it for every stage command
        return None
    pid = os.getppid()
    for _ in range(16):
        try:
            argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state): ppid is [1], starttime [19]
        if any(Path(a).name == "dvc" for a in argv[:2]) or argv[1:3] == ["-m", "dvc"]:
            return f"{pid}-{fields[19]}"
        pid = int(fields[1])
        if pid <= 1:
            return None
    return None


def dvc_experiment_name() -> str | None:
    """The name of the DVC experiment this process runs under, if any.

    ``dvc exp run`` puts ``DVC_EXP_NAME`` in the environment of every stage
    command (dvc/repo/experiments/queue/base.py, ``run_env``), for workspace,
    ``--temp`` and queued experiments; a plain ``dvc repro`` does not.
    """
    return os.environ.get("DVC_EXP_NAME") or None


def _server_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """A TCP connect to the server: a dead port fails at once, a black hole in ``timeout``.

    Only "can we connect" is decided here; HTTP answers (auth, errors) are
    left to MLflow's client. Skipped (True) when a proxy handles the host.
    """
    parsed = urllib.parse.urlparse(uri)
    host = parsed.hostname
    if not host:
        return True, ""
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:  # the message would quote the URL's text
        return False, "invalid host or port in the URI"
    if urllib.request.getproxies().get(parsed.scheme) and not urllib.request.proxy_bypass(host):
        return True, ""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, ""
    except OSError as e:
        return False, e.strerror or type(e).__name__


def one_line_error(err: BaseException) -> str:
    text = scrub(str(err).strip())  # before cutting, so no secret is cut in half and missed
    return text.splitlines()[0][:300] if text else type(err).__name__


_METRIC_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def _metric_key(key: str) -> str:
    """MLflow accepts alphanumerics, ``_ - . /`` and spaces; anything else becomes ``_``."""
    return _METRIC_KEY_BAD.sub("_", str(key))


def _as_float(v: Any) -> float | None:
    """A number as float (python, numpy or one-element torch); None for anything else."""
    if isinstance(v, (str, bytes)) or v is None:
        return None
    if isinstance(v, bool):
        return float(v)
    try:
        if hasattr(v, "item") and callable(v.item):  # numpy / torch scalars
            v = v.item()
        f = float(v)
    except (TypeError, ValueError, RuntimeError):
        return None
    return f


class Run:
    """A thin, failure-tolerant handle on one MLflow run.

    It talks to MLflow through an ``MlflowClient`` bound to this run, not the
    fluent API, so it never depends on (or disturbs) a global "active run".
    Every call is a no-op once tracking is off.
    """

    def __init__(self, stage: str, model: str | None = None) -> None:
        self.stage = stage
        self.model = model  # the namespace of this run's metric names (None: as given)
        self.active = False
        self.run_id: str | None = None
        self.parent_id: str | None = None
        self.experiment_id: str | None = None
        self.tracking_uri: str | None = None
        self._client = None

    @property
    def client(self):
        """The run's own ``MlflowClient`` (same store, same credentials), or None while tracking is off."""
        return self._client if self.active else None

    # -- failure handling -------------------------------------------------
    def fail(self, what: str, err: BaseException) -> None:
        """``what`` failed with ``err``: one warning, and tracking is off for the rest of the run."""
        if self.active:
            log.warning("MLflow tracking off for this run (%s failed: %s); metrics stay in the DVC files",
                        what, one_line_error(err))
        self.active = False

    def _call(self, what: str, fn: Callable[[], Any]) -> None:
        if not self.active:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            self.fail(what, e)

    # -- lifecycle --------------------------------------------------------
    def start(self, params: Mapping[str, Any] | None, tags: Mapping[str, Any] | None) -> None:
        uri = tracking_uri()
        shown = scrub(uri)
        # Telemetry would phone home from an offline pipeline; the user may opt in.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        if uri.startswith(("http://", "https://")):
            for k, v in HTTP_CLIENT_DEFAULTS.items():
                os.environ.setdefault(k, v)
            ok, why = _server_reachable(uri)
            if not ok:
                log.warning("MLflow tracking server %s is unreachable (%s); this run of %s is not tracked "
                            "(metrics stay in the DVC files)", shown, why, self.stage)
                return
        try:
            from mlflow.tracking import MlflowClient

            db = _sqlite_path(uri)
            if db is not None:
                relocate(db)
            client = MlflowClient(tracking_uri=uri)
            self.experiment_id = self._experiment_id(client, uri)
            all_tags = self._tags(tags)
            self.parent_id = self._parent(client, all_tags)
            if self.parent_id:
                all_tags["mlflow.parentRunId"] = self.parent_id
            exp = all_tags.get("dvc_experiment")
            run = client.create_run(self.experiment_id, run_name=scrub(self.stage + (f"@{exp}" if exp else "")),
                                    tags=all_tags)
        except Exception as e:  # noqa: BLE001
            log.warning("MLflow tracking unavailable at %s (%s); this run of %s is not tracked "
                        "(metrics stay in the DVC files)", shown, one_line_error(e), self.stage)
            return
        self._client = client
        self.run_id = run.info.run_id
        self.tracking_uri = uri
        self.active = True
        log.info("MLflow run %s (experiment %r) at %s", self.run_id, EXPERIMENT, shown)
        if params:
            self.log_params(params)

    @staticmethod
    def _experiment_id(client, uri: str) -> str:
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is not None:
            for k, v in EXPERIMENT_KIND.items():  # a store made before the kind was set
                if exp.tags.get(k) != v:
                    client.set_experiment_tag(exp.experiment_id, k, v)
            return exp.experiment_id
        artifact_location = None
        db = _sqlite_path(uri)
        if db is not None:
            # Beside the database, not relative to whichever directory (a
            # temporary experiment workspace, say) happened to create it.
            artifact_location = (db.parent / DEFAULT_ARTIFACTS).resolve().as_uri()
        try:
            return client.create_experiment(EXPERIMENT, artifact_location=artifact_location, tags=EXPERIMENT_KIND)
        except Exception:  # noqa: BLE001 - another stage may have created it meanwhile
            exp = client.get_experiment_by_name(EXPERIMENT)
            if exp is None:
                raise
            return exp.experiment_id

    def _parent(self, client, tags: Mapping[str, str]) -> str | None:
        """The run of the DVC command running this stage (created by its first stage), marked running."""
        key = dvc_invocation()
        if key is None:
            return None
        found = client.search_runs([self.experiment_id], filter_string=f"tags.{INVOCATION_TAG} = '{key}'",
                                   max_results=1)
        if found:
            parent = found[0].info.run_id
            client.update_run(parent, status="RUNNING")
            return parent
        exp = tags.get("dvc_experiment")
        keep = {k: v for k, v in tags.items() if k.startswith("mlflow.") or k in
                ("git_commit", "git_dirty", "dvc_experiment", "dvc_baseline_rev")}
        run = client.create_run(self.experiment_id, run_name=scrub(exp or "dvc repro"),
                                tags={**keep, INVOCATION_TAG: key})
        return run.info.run_id

    def _tags(self, extra: Mapping[str, Any] | None) -> dict[str, str]:
        tags: dict[str, Any] = {}
        try:  # MLflow's own context tags (user, source, git commit; repo URL without credentials)
            from mlflow.tracking.context.registry import resolve_tags

            tags.update(resolve_tags())
        except Exception:  # noqa: BLE001
            tags.update({"mlflow.user": getpass.getuser(), "mlflow.source.name": sys.argv[0] if sys.argv else ""})
        tags["stage"] = self.stage
        commit = _git_commit()
        if commit:
            tags["git_commit"] = commit
            dirty = _git_dirty()
            if dirty is not None:
                tags["git_dirty"] = str(dirty).lower()
        exp = dvc_experiment_name()
        if exp:
            tags["dvc_experiment"] = exp
        baseline = os.environ.get("DVC_EXP_BASELINE_REV")
        if baseline:
            tags["dvc_baseline_rev"] = baseline
        tags.update(extra or {})
        return {str(k): scrub(v)[:_MAX_TAG_LEN] for k, v in redact(tags).items()}

    def end(self, status: str = "FINISHED") -> None:
        if self.active:
            self._call("end_run", lambda: self._client.set_terminated(self.run_id, status=status))
            if self.parent_id:  # the command's run ends with its latest stage (and fails with it)
                self._call("end_run", lambda: self._client.set_terminated(self.parent_id, status=status))
        self.active = False

    # -- logging ----------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        clean = [Param(str(k), scrub(v)[:_MAX_PARAM_LEN]) for k, v in redact(params).items()]
        if clean:
            self._call("log_params", lambda: self._client.log_batch(self.run_id, params=clean))

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numbers (python, numpy or 0-d torch); other values are skipped.

        With ``step`` they form a curve; without, they are the final values (step 0).
        """
        if not self.active:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = []
        for k, v in metrics.items():
            f = _as_float(v)
            if f is None:
                continue
            if math.isnan(f):
                log.debug("metric %s is NaN at step %s", k, step)
            key = f"{self.model}/{k}" if self.model else str(k)
            batch.append(Metric(_metric_key(key), f, ts, int(step or 0)))
        if batch:
            self._call("log_metrics", lambda: self._client.log_batch(self.run_id, metrics=batch))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file, or a directory's contents under ``artifact_path`` (default: its name)."""
        if not self.active:
            return
        p = Path(path)
        if p.is_dir():
            dest = artifact_path if artifact_path is not None else p.name
            self._call("log_artifacts", lambda: self._client.log_artifacts(self.run_id, str(p), dest))
        elif p.is_file():
            self._call("log_artifact", lambda: self._client.log_artifact(self.run_id, str(p), artifact_path))
        else:
            log.debug("not logging missing artifact %s", p)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        clean = [RunTag(str(k), scrub(v)[:_MAX_TAG_LEN]) for k, v in redact(tags).items()]
        if clean:
            self._call("set_tags", lambda: self._client.log_batch(self.run_id, tags=clean))


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, Any] | None = None, enabled: bool = True, model: str | None = None) -> Iterator[Run]:
    """``with stage_run("train_siglip", flat_params, model="siglip") as run: run.log_metrics(...)``.

    ``model``: the namespace of the metric names (``siglip/train/loss``). ``enabled=False`` (non-zero
    DDP ranks) yields an inert run, as does ``VLMPIPE_TRACKING=off``. The run ends FINISHED, FAILED
    (exception) or KILLED (Ctrl-C); the exception itself always propagates.
    """
    run = Run(stage, model)
    if enabled and tracking_enabled():
        run.start(params, tags)
    try:
        yield run
    except KeyboardInterrupt:
        run.end("KILLED")
        raise
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")
