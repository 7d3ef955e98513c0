"""Run the pipeline as a SageMaker training job on one ml.g5.12xlarge (4 x A10G), from your laptop.

    pip install sagemaker
    python deploy/sagemaker/launch.py --role arn:aws:iam::123456789012:role/MySageMakerRole \\
        --remote s3://my-bucket/vlmpipe --params presets/full.yaml

The job runs deploy/sagemaker/entry.py: `dvc pull`, `dvc exp run -S launch.nproc_per_node=4 ...`,
`dvc push`. It runs the committed HEAD (uncommitted changes stay here); the role needs read/write access
to the --remote bucket. Results: the models on the DVC remote, dvc.lock/params.yaml/reports in the job's
model.tar.gz (put dvc.lock and params.yaml into your checkout, then `dvc pull`).

Why no ``distribution={"torch_distributed": {"enabled": True}}``: with it SageMaker starts
``torchrun --nproc_per_node <GPUs> entry.py`` on every instance, i.e. four copies of entry.py per
instance, each running `dvc pull` / `dvc exp run` on the same repository (DVC's lock refuses, or the
copies overwrite each other's outputs), and each GPU stage would then start its own torchrun inside
SageMaker's. Here DVC has to run once, and ``python -m vlmpipe.loop.launch`` (dvc.yaml's command for the GPU
stages) starts the 4 processes of each stage that DVC decides to run, with the counts that dvc.lock
records. So: one instance, no ``distribution``, entry.py run once.

Several instances (not wired up here): instance_count=N and still no ``distribution``; SageMaker then runs
entry.py once per host (SM_HOSTS, SM_CURRENT_HOST). The hosts share no disk, and every rank reads the
data while rank 0 writes the outputs, so the repository must live on a shared filesystem: FSx for Lustre
or EFS, given to fit() as a ``sagemaker.inputs.FileSystemInput`` (with subnets and security groups), and
entry.py would cd into it. Then, with launch.nnodes=N and launch.rdzv_endpoint=algo-1:29400 in
params.yaml: algo-1 runs the CPU stages (`dvc repro download_coco build_cifar_qa_csv build_conversations
prepare_qa_base`); every host runs,
per GPU stage in DAG order, ``python -m vlmpipe.loop.launch --node --rdzv-endpoint algo-1:29400
stages/<stage>.py``; algo-1 runs `dvc repro` (the evaluations and the report) and `dvc commit`, which records in dvc.lock
the outputs the launchers wrote without DVC; then `dvc push`. That reruns every GPU stage each time;
deploy/kubernetes/node.sh shows how the other hosts can follow DVC's decisions instead.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def git(*args: str | Path, cwd: Path = REPO) -> str:
    return subprocess.run(["git", "-C", str(cwd), *map(str, args)], check=True, capture_output=True,
                          text=True).stdout.strip()


def snapshot(tmp: Path, params: str | None) -> Path:
    """A clean clone of HEAD to upload. SageMaker tars the whole source_dir, so the working tree itself
    would send .venv, data/, models/ and the DVC cache; the clone keeps .git (DVC experiments need Git)."""
    if git("status", "--porcelain", "--untracked-files=no"):
        print("launch.py: uncommitted changes are not uploaded; the job runs HEAD", file=sys.stderr)
    src = tmp / "vlmpipe"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(src)], check=True)
    git("checkout", "--quiet", git("rev-parse", "HEAD"), cwd=src)
    # `dvc exp run` commits the experiment to a Git ref, which needs an author.
    git("config", "user.name", "vlmpipe SageMaker job", cwd=src)
    git("config", "user.email", "sagemaker@vlmpipe.invalid", cwd=src)
    # The entry point must sit at the root of source_dir; excluded so that it is not part of the experiment.
    shutil.copy2(Path(__file__).with_name("entry.py"), src / "entry.py")
    with open(src / ".git" / "info" / "exclude", "a") as f:
        f.write("/entry.py\n")
    if params:  # e.g. presets/full.yaml over params.yaml; the experiment records it as a params change
        shutil.copy2(REPO / params, src / "params.yaml")
    return src


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", required=True, help="the SageMaker execution role's ARN")
    ap.add_argument("--remote", required=True, help="the DVC remote's S3 URL, e.g. s3://my-bucket/vlmpipe")
    ap.add_argument("--params", help="a params file (relative to the repository) to run in place of params.yaml")
    ap.add_argument("--set", action="append", default=["phi2.train.grad_accum=2"], metavar="PARAM=VALUE",
                    help="more `dvc exp run -S` values. The default keeps the full preset's global batch of 8 "
                         "divisible by 4 GPUs x grad_accum (its one-GPU grad_accum 8 is not): 4 x 2 micro-steps "
                         "of 1 sample, the same step")
    ap.add_argument("--instance-type", default="ml.g5.12xlarge")
    # Pick a PyTorch container with Python 3.11 whose torch matches requirements.txt; otherwise SageMaker's
    # pip install of requirements.txt replaces the container's torch with the pinned one (a large download
    # each job). Or bring your own image with --image-uri.
    ap.add_argument("--framework-version", default="2.5")
    ap.add_argument("--py-version", default="py311")
    ap.add_argument("--image-uri")
    ap.add_argument("--max-run-hours", type=int, default=48)
    ap.add_argument("--no-wait", action="store_true", help="return once the job is created")
    a = ap.parse_args()

    from sagemaker.pytorch import PyTorch  # imported here so that --help works without the SDK

    # Visible in the job's description: never put credentials here (the role gives S3 access).
    env = {"VLMPIPE_DVC_REMOTE": a.remote}
    if os.environ.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    image = {"image_uri": a.image_uri} if a.image_uri else {"framework_version": a.framework_version,
                                                             "py_version": a.py_version}
    with tempfile.TemporaryDirectory() as tmp:
        estimator = PyTorch(
            entry_point="entry.py",
            source_dir=str(snapshot(Path(tmp), a.params)),  # its requirements.txt is pip-installed by SageMaker
            role=a.role,
            instance_type=a.instance_type,
            instance_count=1,                # no `distribution`: see the docstring
            hyperparameters={"set": " ".join(a.set)},
            environment=env,
            volume_size=200,                 # GB: COCO (20.4 GB), the DVC cache, hub models, checkpoints
            max_run=a.max_run_hours * 3600,
            disable_profiler=True,           # no SageMaker Debugger/Profiler hooks in the training processes
            debugger_hook_config=False,
            **image,
        )
        estimator.fit(wait=not a.no_wait)   # uploads source_dir before returning, so tmp may go afterwards
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
