"""MLflow tracking that never takes a training run down with it.

Every stage execution is one MLflow run in the ``vlmpipe`` experiment::

    with stage_run("train_siglip", flatten(to_dict(p.siglip))) as run:
        run.log_metrics({"loss": 0.7}, step=10)      # per step
        run.log_metrics({"zero_shot_acc": 0.93})     # final
        run.log_artifact("reports/siglip/train_curve.csv")

Tags: ``stage``, ``git_commit`` (+ ``git_dirty``) and, under ``dvc exp run``,
``dvc_experiment`` (the experiment's name) and ``dvc_baseline_rev``. DVC
exports ``DVC_EXP_NAME``, ``DVC_EXP_BASELINE_REV`` and ``DVC_ROOT`` to every
stage command it runs for an experiment (workspace, ``--temp`` and queued runs
alike, verified with dvc 3.67).

Where runs go: ``MLFLOW_TRACKING_URI`` if set (e.g. an MLflow server), else
``sqlite:///mlflow.db`` in the repository root (``$DVC_ROOT``, which points at
the user's repository even when DVC runs the stage in a temporary experiment
workspace; else the current directory), with artifacts in ``mlartifacts/``
beside it. ``VLMPIPE_TRACKING=off`` switches tracking off.

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
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

log = logging.getLogger(__name__)

EXPERIMENT = "vlmpipe"
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


def _git_dirty() -> bool | None:
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


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

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.active = False
        self.run_id: str | None = None
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

            client = MlflowClient(tracking_uri=uri)
            self.experiment_id = self._experiment_id(client, uri)
            all_tags = self._tags(tags)
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
            return exp.experiment_id
        artifact_location = None
        db = _sqlite_path(uri)
        if db is not None:
            # Beside the database, not relative to whichever directory (a
            # temporary experiment workspace, say) happened to create it.
            artifact_location = (db.parent / DEFAULT_ARTIFACTS).resolve().as_uri()
        try:
            return client.create_experiment(EXPERIMENT, artifact_location=artifact_location)
        except Exception:  # noqa: BLE001 - another stage may have created it meanwhile
            exp = client.get_experiment_by_name(EXPERIMENT)
            if exp is None:
                raise
            return exp.experiment_id

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
            batch.append(Metric(_metric_key(k), f, ts, int(step or 0)))
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
              tags: Mapping[str, Any] | None = None, enabled: bool = True) -> Iterator[Run]:
    """``with stage_run("train_siglip", flat_params) as run: run.log_metrics(...)``.

    ``enabled=False`` (non-zero DDP ranks) yields an inert run, as does
    ``VLMPIPE_TRACKING=off``. The run ends FINISHED, FAILED (exception) or
    KILLED (Ctrl-C); the exception itself always propagates.
    """
    run = Run(stage)
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
