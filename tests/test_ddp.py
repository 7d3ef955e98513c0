"""train_siglip under `torchrun --nproc_per_node=2` (gloo, CPU) against one process with the same global batch,
and precompute_embeddings sharded over two ranks.

Why the curves can match: the loop gives each rank B/2 samples of the same
global batch; the sigmoid loss all-gathers the text embeddings so every image
still meets all B texts; and BatchNorm layers become a global-batch BatchNorm
(torch's SyncBatchNorm is CUDA-only, so the loop has its own for gloo). The
mathematics is then identical, and the first two steps agree to 1e-5.

Tolerance for the rest of the curve: 1e-3 relative up to step 3, then 5e-2.
Summation order differs (convolutions over 16 instead of 32 images,
all-reduced gradients), and AdamW at these learning rates amplifies float
noise step by step: measured on this tiny run, the SAME single process with 1
vs 2 threads drifts apart by up to 0.6 % in 12 steps, and 2 ranks vs 1 process
by 0.01 % at step 3, 0.25 % at step 4 and up to 2.9 % at step 9 (with the
current SigLIP text mix). The bugs this guards against are far larger at step
1 already: per-rank BatchNorm (no sync) is off by 1.4 %, negatives from the
local rank only by ~50 %; the loose bound on the whole curve checks that the
two runs stay on one trajectory.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.slow  # torchrun and the stage scripts as subprocesses


@pytest.fixture(scope="module")
def ddp_workdir(tmp_path_factory, tiny_cifar, tiny_coco):
    """A working directory with data/cifar, data/cifar_qa.csv, data/coco and a tiny params.yaml."""
    from vlmpipe.sources import qa

    d = tmp_path_factory.mktemp("ddp")
    shutil.copytree(tiny_cifar, d / "data/cifar")
    shutil.copytree(tiny_coco, d / "data/coco")
    qa.write_qa_csv(d / "data/cifar_qa.csv", d / "data/cifar", seed=0)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["siglip"].update(embed_dim=64, text_width=32, text_layers=1, text_vocab_size=512)
    params["siglip"]["train"].update(epochs=2, batch_size=32, checkpoint_every=0, device="cpu")
    params["embeddings"].update(batch_size=16, device="cpu")
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    return d


@pytest.fixture(scope="module")
def one_process(ddp_workdir, tmp_path_factory) -> Path:
    """train_siglip in one process: the reference both multi-process runs are held to (run once)."""
    one = tmp_path_factory.mktemp("ddp_one") / "one"
    shutil.copytree(ddp_workdir, one)
    _run(one, "train_siglip.py", 1)
    return one


def _env() -> dict:
    # A closed port: tracking is skipped at once (its own tests cover MLflow).
    return {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}


def _run(cwd: Path, script: str, nproc: int) -> None:
    cmd = [sys.executable, str(REPO / "stages" / script)] if nproc == 1 else \
        [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", str(REPO / "stages" / script)]
    r = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def _curve(d: Path) -> list[float]:
    with open(d / "reports/siglip/train_curve.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_two_ranks_match_one_process_and_shard_embeddings(ddp_workdir, one_process, tmp_path):
    one, two = one_process, tmp_path / "two"
    shutil.copytree(ddp_workdir, two)
    _run(two, "train_siglip.py", 2)

    a, b = _curve(one), _curve(two)
    assert len(a) == len(b) == 12  # 200 images // 32 per step x 2 epochs
    assert a[:2] == pytest.approx(b[:2], rel=1e-5)
    assert a[:3] == pytest.approx(b[:3], rel=1e-3)
    assert a == pytest.approx(b, rel=5e-2)
    assert a[-1] < a[0]
    identity = json.loads(next((two / "models/checkpoints/siglip").glob("step_*/identity.json")).read_text())
    assert identity["world_size"] == 2

    # Embeddings sharded over 2 ranks equal the same model's embeddings computed in one process.
    _run(two, "precompute_embeddings.py", 2)
    from vlmpipe.data import features as E
    from vlmpipe.data.cifar import load_split
    from vlmpipe.models.siglip.model import load_siglip

    model = load_siglip(two / "models/siglip")
    ident = E.siglip_identity(two / "models/siglip")
    test = load_split(two / "data/cifar", "test")
    got = E.load(two / "data/embeddings", "cifar", "test", expect_encoder=ident)
    assert got.ids.tolist() == list(range(len(test)))
    torch.testing.assert_close(got.embeddings[:, 0].float(), model.encode_images(test.images), atol=2e-3, rtol=0)
    coco = E.load(two / "data/embeddings", "coco", "val", expect_encoder=ident)
    assert coco.embeddings.shape[1:] == (5, 64)


def test_two_machines_train_what_one_process_trains(ddp_workdir, one_process, tmp_path):
    """`launch.nnodes: 2`: two launchers with --node, as on two machines, meet at a c10d rendezvous on
    loopback (1 process each) and train train_siglip with the global batch of one process. Same bound
    as above, for the same reasons: the mathematics is one process's; float noise grows with steps."""
    import servers

    one, two = one_process, tmp_path / "nodes"
    shutil.copytree(ddp_workdir, two)
    port = servers.free_port()
    params = yaml.safe_load((two / "params.yaml").read_text())
    params["launch"].update(nnodes=2, rdzv_endpoint=f"127.0.0.1:{port}", rdzv_timeout=120)
    (two / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "vlmpipe.loop.launch", "--node", str(REPO / "stages/train_siglip.py")]
    env = {**_env(), "PYTHONPATH": str(REPO)}
    nodes = [subprocess.Popen(cmd, cwd=two, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [e[-2000:] for _, e in outs]
    a, b = _curve(one), _curve(two)
    assert len(a) == len(b) == 12
    assert a[:2] == pytest.approx(b[:2], rel=1e-5)
    assert a == pytest.approx(b, rel=5e-2)
    speed = json.loads((two / "reports/speed/siglip.json").read_text())
    assert speed["world_size"] == 2
