"""MLflow tracking that never takes a training run down with it.

Every stage execution is one MLflow run in the ``vlmpipe`` experiment, tagged
with the stage name, git commit and DVC experiment name (when running under
``dvc exp run``). The tracking URI comes from ``MLFLOW_TRACKING_URI`` and
defaults to ``sqlite:///mlflow.db`` in the repository.

If the tracking store is unreachable or refuses a call, one warning is logged
and tracking is switched off for the rest of the run: the stage still
completes and its DVC metrics and plots are still written.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping

log = logging.getLogger(__name__)

EXPERIMENT = "vlmpipe"
DEFAULT_URI = "sqlite:///mlflow.db"

# Keys whose values must never reach MLflow (params, tags or logs).
_SECRET_RE = re.compile(r"(secret|token|password|passwd|credential|access_key|api_key|auth)", re.I)


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_RE.search(key))


def redact(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: ("***" if is_secret_key(k) else v) for k, v in d.items()}


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def dvc_experiment_name() -> str | None:
    """The name of the DVC experiment this process runs under, if any.

    ``dvc exp run`` exports ``DVC_EXP_NAME`` to stage commands (DVC >= 3.x).
    """
    return os.environ.get("DVC_EXP_NAME") or None


def _http_reachable(uri: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class Run:
    """A thin, failure-tolerant handle on one MLflow run."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.active = False
        self._mlflow = None

    def _disable(self, what: str, err: BaseException) -> None:
        if self.active:
            log.warning("MLflow tracking off for this run (%s failed: %s); metrics stay in the DVC files",
                        what, str(err).splitlines()[0][:200] if str(err) else type(err).__name__)
        self.active = False

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        if not self.active:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            self._disable(what, e)

    def start(self, params: Mapping[str, Any] | None, tags: Mapping[str, str] | None) -> None:
        uri = tracking_uri()
        if uri.startswith(("http://", "https://")):
            # mlflow's client retries for minutes against a dead server; probe
            # once, quickly, and keep its retries short for the rest of the run.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            if not _http_reachable(uri):
                log.warning("MLflow tracking server %s is unreachable; this run is not tracked "
                            "(metrics stay in the DVC files)", uri)
                return
        try:
            import mlflow

            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(EXPERIMENT)
            all_tags = {"stage": self.stage}
            commit = _git_commit()
            if commit:
                all_tags["git_commit"] = commit
            exp = dvc_experiment_name()
            if exp:
                all_tags["dvc_experiment"] = exp
            all_tags.update(tags or {})
            mlflow.start_run(run_name=f"{self.stage}" + (f"@{exp}" if exp else ""), tags=redact(all_tags))
            self._mlflow = mlflow
            self.active = True
        except Exception as e:  # noqa: BLE001
            log.warning("MLflow tracking unavailable at %s (%s); this run is not tracked", uri,
                        str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            return
        if params:
            flat = redact(params)
            # MLflow caps a param value at 6000 characters.
            flat = {k: str(v)[:6000] for k, v in flat.items()}
            self._call("log_params", self._mlflow.log_params, flat)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
        if clean:
            self._call("log_metrics", self._mlflow and self._mlflow.log_metrics, clean, step=step)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self._call("log_artifact", self._mlflow and self._mlflow.log_artifact, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._call("set_tags", self._mlflow and self._mlflow.set_tags, redact(tags))

    def end(self, status: str = "FINISHED") -> None:
        if self.active:
            self._call("end_run", self._mlflow.end_run, status=status)
        self.active = False


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, str] | None = None, enabled: bool = True) -> Iterator[Run]:
    """``with stage_run("train_siglip", flat_params) as run: run.log_metrics(...)``.

    ``enabled=False`` (non-zero DDP ranks) yields an inert run.
    """
    run = Run(stage)
    if enabled:
        run.start(params, tags)
    try:
        yield run
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")
