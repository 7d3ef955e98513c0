"""The trained models in MLflow's model registry.

Each training stage logs its model as an MLflow pyfunc model and registers it, on rank 0::

    with stage_run("train_gpt2_captioner", params) as run:
        ...
        registry.log_model(run, "captioner", Path("models/captioner"))   # -> vlmpipe-captioner, version N

The pyfunc (``vlmpipe/face/pyfunc_model.py``: input and output columns per kind) is logged "from
code": MLflow keeps that file with the model and runs it at load time, so nothing is pickled.
This module names the file and does not import it: a stage's deps are the modules it imports,
and the pyfunc imports the CLI, which must never retrain a model.

What the logged model holds, so that ``models:/vlmpipe-<kind>/<version>`` loads wherever the
requirements are installed, without a checkout of this repository (and, for the offline
default's models, without a network):

- ``artifacts/``: the model folder (the DVC output) and, for a model whose features come from
  the project's SigLIP (``encoder.path`` in its ``model.json``), that SigLIP folder too; the
  pyfunc points the model at this copy. Hub parts that a preset names (the full preset's CLIP
  encoder, the Phi-2 base under the QA adapter) are referenced by their pinned revision, not
  copied, and are fetched or read from the Hugging Face cache at load time like the CLI does.
- ``code/vlmpipe/``: this package as it trained the model (the loaders must match the saved format).
- ``requirements.txt``: the inference packages pinned to the versions installed here, written
  out explicitly so that MLflow does not load the model to infer them.

The model version carries the run's tags ``stage``, ``git_commit`` (+ ``git_dirty``),
``dvc_experiment`` and ``dvc_baseline_rev`` (under ``dvc exp run``), ``model_dir``,
``weights_sha256`` (of every file in the model folder), and the run id.

The evaluation stage that scores a model finds the version of the weights it scored (by
``weights_sha256``), tags it with the held-out metrics (``eval.<metric>``) and moves an alias:
``champion`` when it beats the current champion on its headline metric (``HEADLINE``: R@1, VQA
accuracy, CIDEr, chat exact match; higher is better), ``candidate`` otherwise. So
``models:/vlmpipe-qa@champion`` is the best QA model trained in this store, whatever ran last.

Registration follows the run's failure policy (``vlmpipe/ops/tracking.py``): a store that is
down or refuses costs one warning, never the stage or its DVC outputs; with tracking off
(``VLMPIPE_TRACKING=off``) nothing is logged.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from vlmpipe.core.download import file_digest
from vlmpipe.core.io import read_json
from vlmpipe.ops.tracking import Run, one_line_error, process_store

log = logging.getLogger(__name__)

KINDS = ("siglip", "captioner", "qa", "chat")
# The file in a model's folder that says what it is, logged as a run artifact of its own.
CONFIG_FILE = {"siglip": "config.json", "captioner": "model.json", "qa": "model.json", "chat": "model.json"}
PACKAGE = Path(__file__).resolve().parents[1]
PYFUNC_CODE = PACKAGE / "face" / "pyfunc_model.py"
# What loading and running the models imports (vlmpipe itself travels as code).
INFERENCE_PACKAGES = ("mlflow", "torch", "torchvision", "transformers", "tokenizers", "safetensors", "peft",
                      "bitsandbytes", "accelerate", "numpy", "pandas", "pillow", "tqdm")
RUN_TAGS = ("stage", "git_commit", "git_dirty", "dvc_experiment", "dvc_baseline_rev")
# Each kind's headline metric in its held-out evaluation (reports/eval/*.json): higher is better.
HEADLINE = {"siglip": "i2t_r1", "qa": "accuracy", "captioner": "cider", "chat": "exact_match"}
CHAMPION, CANDIDATE = "champion", "candidate"
DESCRIPTIONS = {
    "siglip": "vlmpipe SigLIP image tower: image -> 512-d embedding (text -> embedding too)",
    "captioner": "vlmpipe captioner: image -> caption",
    "qa": "vlmpipe visual QA model (Phi-2 QLoRA): image + question (+ history) -> answer",
    "chat": "vlmpipe chat model: image + message (+ history) -> reply",
}


def registered_name(kind: str) -> str:
    return f"vlmpipe-{kind}"


def log_model(run: Run, kind: str, model_dir: str | Path):
    """Log the model's config file and ``model_dir`` as an MLflow model of ``kind``, registered as
    ``vlmpipe-<kind>``.

    Returns the new ``ModelVersion``, or None when the run is not tracked or registering failed.
    A failure costs one warning and never raises: a store that no longer answers turns tracking
    off for the rest of the run (the run's policy); a store that answers but refuses (say, no
    permission on the registry) leaves the run tracked, so it still ends FINISHED.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not run.active:
        return None
    name = registered_name(kind)
    try:
        return _log_and_register(run, kind, Path(model_dir))
    except Exception as e:  # noqa: BLE001 - a model not registered must not fail the stage
        try:
            run.client.get_run(run.run_id)  # is the store still answering?
        except Exception:  # noqa: BLE001
            run.fail(f"registering {name}", e)  # the one warning; tracking off
            return None
        log.warning("MLflow model %s not registered (%s); the run and the stage's outputs are unaffected",
                    name, one_line_error(e))
        return None


def _log_and_register(run: Run, kind: str, model_dir: Path):
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    client = run.client  # the run's own client: same store, same credentials
    # Copying two local folders is not a download worth two progress bars in the stage's log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    tags = {k: v for k, v in client.get_run(run.run_id).data.tags.items() if k in RUN_TAGS}
    tags["model_dir"] = model_dir.as_posix()
    tags["weights_sha256"] = weights_digest(model_dir)
    client.log_artifact(run.run_id, str(model_dir / CONFIG_FILE[kind]))
    name = registered_name(kind)
    logged = client.create_logged_model(run.experiment_id, name=kind, source_run_id=run.run_id, tags=tags)
    try:
        with tempfile.TemporaryDirectory(prefix="vlmpipe-mlflow-model-") as tmp:
            path = Path(tmp) / "model"
            with warnings.catch_warnings():
                # Advice for a model without a signature: this one has an explicit signature instead of
                # an input example (which MLflow would run through the model to check it).
                warnings.filterwarnings("ignore", ".*An input example was not provided", UserWarning)
                mlflow.pyfunc.save_model(
                    path, python_model=str(PYFUNC_CODE), artifacts=_artifacts(kind, model_dir),
                    code_paths=[str(PACKAGE)], pip_requirements=_requirements(), signature=_signature(kind),
                    model_config={"kind": kind},
                    mlflow_model=Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id,
                                       run_id=run.run_id, model_id=logged.model_id))
            for cache in list(path.rglob("__pycache__")):  # bytecode of this machine's Python, not code
                shutil.rmtree(cache)
            client.log_model_artifacts(logged.model_id, str(path))
    except BaseException:
        try:  # the store may be the thing that failed; the original error is the one to report
            client.finalize_logged_model(logged.model_id, "FAILED")
        except Exception:  # noqa: BLE001
            pass
        raise
    client.finalize_logged_model(logged.model_id, "READY")
    client.log_outputs(run.run_id, [LoggedModelOutput(logged.model_id, step=0)])
    try:  # the first version creates the registered model; later ones find it there
        client.create_registered_model(name, description=DESCRIPTIONS[kind])
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    with process_store(run.tracking_uri):
        version = client.create_model_version(name, source=f"models:/{logged.model_id}", run_id=run.run_id,
                                              tags=tags, model_id=logged.model_id)
    log.info("registered %s version %s (models:/%s/%s)", name, version.version, name, version.version)
    return version


def weights_digest(model_dir: str | Path) -> str:
    """sha256 over a model folder: every file's path within it and its own sha256, in path order."""
    root = Path(model_dir)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + file_digest(f, "sha256").encode() + b"\n")
    return h.hexdigest()


def score_version(run: Run, kind: str, model_dir: str | Path, metrics: dict):
    """Tag the registered version of the weights in ``model_dir`` with its held-out ``metrics`` and move
    ``champion`` to it when it beats the current champion on ``HEADLINE[kind]``, else ``candidate``.

    Returns the alias set, or None when nothing was (tracking off, no version of these weights was
    registered, or the store refused: one warning, never the stage).
    """
    if not run.active:
        return None
    name = registered_name(kind)
    try:
        return _score(run.client, kind, name, weights_digest(model_dir), metrics)
    except Exception as e:  # noqa: BLE001 - the evaluation's outputs stand without the registry
        log.warning("MLflow model %s: the evaluation was not recorded on its version (%s)", name, one_line_error(e))
        return None


def _score(client, kind: str, name: str, digest: str, metrics: dict):
    from mlflow.exceptions import MlflowException

    versions = client.search_model_versions(f"name = '{name}' and tag.weights_sha256 = '{digest}'")
    if not versions:
        log.info("MLflow model %s: no registered version holds these weights (trained with tracking off?); "
                 "the evaluation is not recorded there", name)
        return None
    version = max(versions, key=lambda v: int(v.version))
    headline = HEADLINE[kind]
    score = float(metrics[headline])
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            client.set_model_version_tag(name, version.version, f"eval.{k}", repr(float(v)))
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no champion yet
        champion = None
    best = champion.tags.get(f"eval.{headline}") if champion is not None else None
    same = champion is not None and str(champion.version) == str(version.version)  # an int or a str, by call
    if champion is None or same or best is None or score > float(best):
        alias = CHAMPION
    else:
        alias = CANDIDATE
    client.set_registered_model_alias(name, alias, version.version)
    if alias == CHAMPION:
        try:  # the new champion is no longer a candidate
            if str(client.get_model_version_by_alias(name, CANDIDATE).version) == str(version.version):
                client.delete_registered_model_alias(name, CANDIDATE)
        except MlflowException:
            pass
    log.info("MLflow model %s version %s: %s %.4f (champion before: %s) -> @%s", name, version.version, headline,
             score, "none" if best is None else f"version {champion.version}, {float(best):.4f}", alias)
    return alias


def _artifacts(kind: str, model_dir: Path) -> dict[str, str]:
    """The model folder, and the trained SigLIP its features come from (recorded relative to it)."""
    out = {"model": str(model_dir.resolve())}
    if kind != "siglip":
        encoder = read_json(model_dir / "model.json").get("encoder", {})
        if encoder.get("name") == "siglip" and encoder.get("path"):
            out["encoder"] = str((model_dir / encoder["path"]).resolve())
    return out


def _requirements() -> list[str]:
    return [f"{p}=={importlib.metadata.version(p)}" for p in INFERENCE_PACKAGES]


def _signature(kind: str):
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import AnyType, Array, ColSpec, Schema

    image = ColSpec(DataType.string, "image")
    # Any, not Array(Array(string)): MLflow's check refuses the NaN that a record without a history
    # becomes; the pyfunc checks the [turn, reply] pairs itself.
    history = ColSpec(AnyType(), "history", required=False)
    if kind == "siglip":
        return ModelSignature(
            Schema([image, ColSpec(DataType.string, "text", required=False)]),
            Schema([ColSpec(Array(DataType.float), "image_embedding"),
                    ColSpec(Array(DataType.float), "text_embedding", required=False)]))
    inputs = {"captioner": [image], "qa": [image, ColSpec(DataType.string, "question"), history],
              "chat": [image, ColSpec(DataType.string, "message"), history]}[kind]
    return ModelSignature(Schema(inputs), Schema([ColSpec(DataType.string)]))
