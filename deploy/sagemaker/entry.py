"""SageMaker entry point: the whole pipeline on one training instance, driven by DVC.

launch.py uploads a clean clone of the repository as ``source_dir`` with this file copied to its root
(SageMaker runs an entry point from the root of source_dir). By the time this runs, SageMaker has
installed requirements.txt with pip, and the working directory, /opt/ml/code, is the repository.
SageMaker runs it once (no ``distribution``): DVC drives the stages, and ``vlmpipe.loop.launch`` starts one
process per GPU for the GPU stages (launch.py says why torchrun is not left to SageMaker).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path


def dvc(*args: str, check: bool = True) -> int:
    print("+ dvc", " ".join(args), flush=True)
    return subprocess.run([sys.executable, "-m", "dvc", *args], check=check).returncode


def keep_results() -> None:
    """What SageMaker uploads when the job ends (model.tar.gz and output.tar.gz under the job's S3 output
    path). The data and models themselves go to the DVC remote: put this dvc.lock and params.yaml into
    your checkout and `dvc pull` fetches what the job made."""
    model_dir = Path(os.environ.get("SM_MODEL_DIR", "/opt/ml/model"))
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.lock", "params.yaml"):
        if Path(name).is_file():
            shutil.copy2(name, model_dir / name)
    if Path("reports").is_dir():
        shutil.copytree("reports", model_dir / "reports", dirs_exist_ok=True)
    # Without MLFLOW_TRACKING_URI the runs went to ./mlflow.db and ./mlartifacts, which die with the container.
    out_dir = Path(os.environ.get("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if Path("mlflow.db").is_file():
        shutil.copy2("mlflow.db", out_dir / "mlflow.db")
    if Path("mlartifacts").is_dir():
        shutil.copytree("mlartifacts", out_dir / "mlartifacts", dirs_exist_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", default="", help="space-separated PARAM=VALUE for `dvc exp run -S` (from launch.py)")
    args, _ = ap.parse_known_args()  # SageMaker may pass more hyperparameters; only --set is ours

    # The repository's own package: stage scripts and every rank import vlmpipe from here (no pip install,
    # which would write into the Git work tree that `dvc exp run` commits).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # download_coco hard-links the archives it keeps whole into data/coco when the download folder is on the
    # repository's filesystem (docs/full-preset.md, "Disk"); beside the repository, not inside its Git work tree.
    os.environ.setdefault("VLMPIPE_DOWNLOAD_DIR", str(Path.cwd().parent / "vlmpipe-downloads"))

    # .dvc/config.local (your credentials and bucket) is git-ignored and so not uploaded: the bucket comes
    # from launch.py, the credentials from the job's IAM role (boto's default chain inside the container).
    remote = os.environ.get("VLMPIPE_DVC_REMOTE", "")
    if remote:
        dvc("remote", "modify", "--local", "storage", "url", remote)

    gpus = int(os.environ.get("SM_NUM_GPUS", "1"))
    sets = [f"launch.nproc_per_node={gpus}", "launch.nnodes=1", *args.set.split()]
    try:
        # What earlier jobs pushed (data/coco, embeddings, finished models, checkpoints): DVC then reruns only
        # what changed. --allow-missing: the first job finds an empty remote.
        dvc("pull", "--allow-missing")
        dvc("exp", "run", *[x for s in sets for x in ("-S", s)])
    finally:
        # Also after a failure: the stages that finished are pushed, and their dvc.lock kept.
        keep_results()
        pushed = dvc("push", check=False) == 0
    if not pushed:
        print("entry.py: dvc push failed (above): the job's data and models are not on the remote", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
