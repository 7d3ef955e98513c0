"""Preflight: what a preset fetches, checked before a stage starts work (no network is touched:
hub lookups run with HF_HUB_OFFLINE=1, mirrors point at a closed loopback port)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import servers
from vlmpipe.core.errors import UserError
from vlmpipe.ops.preflight import load_all as load_params
from vlmpipe.ops.preflight import NEEDS, preflight, stage_needs, stages_to_check

ROOT = Path(__file__).resolve().parents[1]
ALL = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


def _repo(tmp_path: Path, outs: tuple[str, ...] = ()) -> Path:
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    for o in outs:
        (tmp_path / o).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / o).mkdir(exist_ok=True)
    return tmp_path / "dvc.yaml"


def test_a_fresh_repository_checks_every_stage_from_the_first(tmp_path):
    assert stages_to_check("download_coco", _repo(tmp_path)) == ["download_coco", *[s for s in ALL if s != "download_coco"]]


def test_upstream_and_finished_stages_are_not_checked_again(tmp_path):
    done = ("data/coco", "data/cifar", "data/cifar_qa.csv", "models/siglip", "models/checkpoints/siglip",
            "data/embeddings")
    got = stages_to_check("train_phi2_qlora", _repo(tmp_path, done))
    # Upstream stages ran already (their archives may be gone; the QA base is upstream too); the captioner,
    # the conversations, the chat model, the evaluations, the report and the data-exploration page are to come.
    assert got == ["train_phi2_qlora", "train_gpt2_captioner", "build_conversations", "train_gpt2_chat",
                   "evaluate_siglip", "evaluate_qa", "evaluate_captioner", "evaluate_chat", "report", "explore_data"]


@pytest.fixture
def full_offline(tmp_path, monkeypatch):
    """The full preset on a machine with nothing cached and no hub access; mirrors on a closed port."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("VLMPIPE_DOWNLOAD_DIR", str(tmp_path / "downloads"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    # The ResNet-50 weights are pre-placed, so nothing below depends on whether this machine is online.
    from vlmpipe.models.siglip.image_tower import weights_file

    weights_file("resnet50").parent.mkdir(parents=True)
    weights_file("resnet50").write_bytes(b"placed")
    text = (ROOT / "presets/full.yaml").read_text()
    port = servers.dead_port()
    text = text.replace("  url: ''          # a mirror's base URL", f'  url: "http://127.0.0.1:{port}/coco"  #', 1)
    text = text.replace("  url: ''          # a mirror's URL of cifar-10-python.tar.gz",
                        f'  url: "http://127.0.0.1:{port}/cifar-10-python.tar.gz"', 1)
    text = text.replace("  url: ''                # llava_instruct_150k: a mirror",
                        f'  url: "http://127.0.0.1:{port}/llava_instruct_150k.json"  #', 1)
    text = text.replace("  split_url: ''     # karpathy: a mirror's URL",
                        f'  split_url: "http://127.0.0.1:{port}/karpathy/caption_datasets.zip"  #', 1)
    (tmp_path / "params.yaml").write_text(text)
    p = load_params(tmp_path / "params.yaml")
    assert p.coco.url and p.cifar.url and p.conversations.url and p.coco.split_url and p.coco.split == "karpathy"
    return p, _repo(tmp_path)


def test_offline_first_stage_names_everything_missing_in_one_line(full_offline):
    p, dvc_yaml = full_offline
    with pytest.raises(UserError) as e:
        preflight("download_coco", p, dvc_yaml)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("download_coco: cannot fetch what the params need: ")
    for what in ("annotations_trainval2017.zip (coco.url)", "train2017.zip (coco.url)", "val2017.zip (coco.url)",
                 "caption_datasets.zip (coco.split_url)",
                 "cifar-10-python.tar.gz (cifar.url, for build_cifar_qa_csv)",
                 f"openai/clip-vit-base-patch16@{p.captioner.vision_encoder_revision} (captioner.vision_encoder",
                 f"microsoft/phi-2@{p.phi2.revision} (phi2.base_model, for train_phi2_qlora)",
                 f"gpt2@{p.captioner.lm_revision} (captioner.lm, for train_gpt2_captioner)",
                 "llava_instruct_150k.json (conversations.url, for build_conversations)"):
        assert what in msg, what
    assert "HF_HUB_OFFLINE=1" in msg and "hf download microsoft/phi-2 --revision" in msg
    assert "resnet50" not in msg  # pre-placed: nothing to fetch


def test_the_needs_table_names_stages_of_the_dag():
    """A stage renamed or split in dvc.yaml (as `evaluate` once was) must not leave its needs unchecked."""
    assert set(NEEDS) <= set(ALL), set(NEEDS) - set(ALL)


def test_each_stage_that_loads_a_hub_model_is_checked_for_it(full_offline):
    p, _ = full_offline
    keys = {stage: {n.key for n in stage_needs(stage, p)} for stage in ALL}
    assert keys["train_phi2_qlora"] == keys["evaluate_qa"] == {"phi2.base_model"}
    assert keys["train_gpt2_captioner"] == {"captioner.lm"}
    assert keys["precompute_embeddings"] == {"captioner.vision_encoder"}
    assert keys["evaluate_captioner"] == ({"captioner.lm"} if p.captioner.freeze_lm else set())
    p.captioner.freeze_lm = True
    assert {n.key for n in stage_needs("evaluate_captioner", p)} == {"captioner.lm"}


def test_what_is_on_disk_passes(full_offline, tmp_path):
    p, dvc_yaml = full_offline
    p.coco.url, p.coco.local_dir = "", str(tmp_path / "mine")
    (tmp_path / "mine").mkdir()
    for name in ("annotations_trainval2017.zip", "train2017.zip", "val2017.zip"):
        (tmp_path / "mine" / name).write_bytes(b"x")
    with pytest.raises(UserError) as e:
        preflight("download_coco", p, dvc_yaml)
    assert "2017.zip" not in str(e.value) and "microsoft/phi-2@" in str(e.value)


def test_the_karpathy_split_file_is_a_need_of_download_coco(full_offline, tmp_path, monkeypatch):
    """Downloaded from Karpathy's site (or a mirror), or the user's copy under inputs/data/; none with
    coco.split: coco2017."""
    from vlmpipe.sources import remote

    p, _ = full_offline
    [need] = [n for n in stage_needs("download_coco", p) if n.key.startswith("coco.split")]
    assert (need.key, need.what) == ("coco.split_url", "caption_datasets.zip") and not need.present()
    assert "caption_datasets.zip in " in need.problem() and "coco.split_path" in need.problem()
    p.coco.split_url = ""
    [need] = [n for n in stage_needs("download_coco", p) if n.key.startswith("coco.split")]
    assert need.key == "coco.split" and remote.karpathy_split() == (remote.KARPATHY_SPLITS, "caption_datasets.zip")
    monkeypatch.chdir(tmp_path)
    p.coco.split_path = "inputs/data/dataset_coco.json"
    [need] = [n for n in stage_needs("download_coco", p) if n.key.startswith("coco.split")]
    assert need.key == "coco.split_path" and not need.present() and "does not exist" in need.problem()
    (tmp_path / "inputs/data").mkdir(parents=True)
    (tmp_path / "inputs/data/dataset_coco.json").write_text("{}")
    assert need.present()
    p.coco.split = "coco2017"
    assert not [n for n in stage_needs("download_coco", p) if n.key.startswith("coco.split")]


def test_the_offline_default_needs_nothing(tmp_path):
    p = load_params(ROOT / "params.yaml")
    for stage in ALL:
        preflight(stage, p, _repo(tmp_path))


def test_stage_script_fails_fast_offline_with_one_line(full_offline, tmp_path):
    """`python stages/download_coco.py` on the offline full preset: exit 2, one line, nothing written."""
    p, dvc_yaml = full_offline
    env = servers.clean_env(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"),
                            TORCH_HOME=str(tmp_path / "torch"), VLMPIPE_DOWNLOAD_DIR=str(tmp_path / "downloads"),
                            VLMPIPE_TRACKING="off")
    r = subprocess.run([sys.executable, str(ROOT / "stages/download_coco.py")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "microsoft/phi-2@" in lines[0] and "train2017.zip" in lines[0]
    assert not (tmp_path / "data").exists()


def test_the_weights_table_is_torchvisions():
    """remote.py's URLs (read by the preflight without importing torchvision models) are the ones
    torchvision downloads for the pinned weights."""
    from vlmpipe.sources import remote
    from vlmpipe.models.siglip.image_tower import IMAGENET_WEIGHTS

    assert {k: w.url for k, w in IMAGENET_WEIGHTS.items()} == remote.IMAGENET_WEIGHTS
