"""The full preset, rehearsed end to end offline with hub-shaped stand-ins.

`presets/full.yaml` is what users run on GPUs with internet. Here it runs through `dvc repro` as it
is — hub ids at their pinned revisions, an ImageNet ResNet-50 (`pretrained: true`, 224 px), CLIP
ViT-B/16 features, GPT-2, Phi-2 in 4-bit with gradient checkpointing, beam 5 — with only devices,
epochs, batch sizes and data sizes overridden, and the mirror params pointed at a loopback server.
Every training stage runs as on a GPU machine, through the launcher with two processes per node
(`launch.nproc_per_node: 2`; gloo on the CPU).
What it would download is pre-placed the way users' machines hold it:

- a Hugging Face hub cache (`models--org--name/refs/main` + `snapshots/<commit>/`) with random-init
  models in the real configurations and file layouts (Phi-2 with 2 of its 32 layers and GPT-2 with 2
  of its 12: the one deviation, for time and disk), and tokenizers trained offline in the real file
  formats;
- a ResNet-50 state dict in `$TORCH_HOME`;
- COCO 2017 and CIFAR-10 archives in the official layouts, and a small ``llava_instruct_150k.json``
  about those COCO images (one more about an image COCO lacks), served over HTTP.

`HF_HUB_OFFLINE=1`: any reach for the network fails. `tests/standins.py` builds all of it.
"""
from __future__ import annotations

import json
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
import yaml

import servers
from conftest import REPO_ROOT, copy_worktree, git

STAGES = ["download_coco", "build_cifar_qa_csv", "train_siglip", "precompute_embeddings", "prepare_qa_base",
          "train_phi2_qlora", "train_gpt2_captioner", "build_conversations", "train_gpt2_chat",
          "evaluate_siglip", "evaluate_qa", "evaluate_captioner", "evaluate_chat", "report"]
N_COCO_TRAIN, N_COCO_VAL = 8, 4
CIFAR_TRAIN_PER_CLASS, CIFAR_TEST_PER_CLASS = 1, 1


def overrides(mirror: str) -> dict:
    """Everything the rehearsal changes in presets/full.yaml: devices, epochs, sizes, and where the
    archives come from. Hub ids, revisions, pretrained, image size, regions, beams, 4-bit and
    gradient checkpointing stay as the preset has them."""
    # One epoch, a checkpoint at the end only (a GPT-2 checkpoint with its optimizer state is 1.5 GB).
    # Two processes: each batch splits across them, then into micro-batches (batch % (2 x grad_accum) == 0).
    cpu = {"device": "cpu", "epochs": 1, "checkpoint_every": 0}
    return {
        # COCO 2017's own split: the rehearsal checks that COCO's archives are linked, not copied, which
        # Karpathy's split does not do (tests/test_coco_karpathy.py runs coco.split: karpathy).
        "coco": {"url": f"{mirror}/coco", "verify": False, "split": "coco2017"},
        "cifar": {"url": f"{mirror}/cifar/cifar-10-python.tar.gz", "verify": False},
        "siglip": {"train": {**cpu, "batch_size": 8}},
        "embeddings": {"device": "cpu", "batch_size": 8},
        # A batch of 4: two conversations per process, in two micro-batches (the accumulation path).
        "phi2": {"eval_questions": 4, "max_new_tokens": 8, "train": {**cpu, "batch_size": 4, "grad_accum": 2}},
        "captioner": {"max_caption_tokens": 12, "train": {**cpu, "batch_size": 20}},
        "conversations": {"url": f"{mirror}/llava/llava_instruct_150k.json"},
        # 7 training conversations: a batch of 4, two per process in two micro-batches.
        "chat": {"eval_turns": 4, "max_new_tokens": 8, "train": {**cpu, "batch_size": 4, "grad_accum": 2}},
        "evaluate": {"device": "cpu", "max_images": 4, "gallery_images": 2},
        "launch": {"nproc_per_node": 2},
    }


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base.get(k) or {}, v) if isinstance(v, dict) else v
    return out


@dataclass
class FullRepo:
    path: Path
    env: dict
    params: dict
    archives: dict[str, Path]
    server_log: list
    downloads: Path
    stage_seconds: dict[str, float] = field(default_factory=dict)
    build_seconds: float = 0.0


@pytest.fixture(scope="module")
def full_repo(request, tmp_path_factory, file_server_session) -> Iterator[FullRepo]:
    """The rehearsal, run once for this module's tests; its folder (about 6 GB: hub stand-ins,
    checkpoints with optimizer state, the DVC cache, MLflow's copies of the models) is removed after
    them unless one of them failed, so that the rest of the suite does not run on a disk it fills."""
    import standins

    failed_before = request.session.testsfailed
    base = tmp_path_factory.mktemp("full")
    preset = yaml.safe_load((REPO_ROOT / "presets/full.yaml").read_text())
    t0 = time.monotonic()
    revisions = {preset["phi2"]["base_model"]: preset["phi2"]["revision"],
                 preset["captioner"]["lm"]: preset["captioner"]["lm_revision"],
                 preset["captioner"]["vision_encoder"]: preset["captioner"]["vision_encoder_revision"]}
    texts = ["a photo of a red circle on a dark background", "Question: what colour is it?\nAnswer: red",
             "a small blue star in the top left and a large green ring", "is this an animal? no"] * 8
    # GPT-2 with 2 of its 12 blocks (as Phi-2 with 2 of 32): at 12 the captioner's and chat model's
    # checkpoints, models and MLflow copies took 5.4 of the rehearsal's 8.8 GB.
    standins.build_hub_cache(base / "hf", revisions, texts, gpt2_layers=2)
    standins.write_resnet50_weights(base / "torch")
    archives = {**standins.coco2017_archives(base / "archives", N_COCO_TRAIN, N_COCO_VAL),
                "cifar-10-python.tar.gz": standins.cifar10_tarball(base / "archives", CIFAR_TRAIN_PER_CLASS,
                                                                    CIFAR_TEST_PER_CLASS)}
    archives["llava_instruct_150k.json"] = standins.llava_instruct_json(
        archives["annotations_trainval2017.zip"], base / "archives" / "llava_instruct_150k.json")
    build_s = time.monotonic() - t0
    srv = file_server_session
    for name, path in archives.items():
        where = {"annotations_trainval2017.zip": "/coco/annotations/", "train2017.zip": "/coco/zips/",
                 "val2017.zip": "/coco/zips/", "cifar-10-python.tar.gz": "/cifar/",
                 "llava_instruct_150k.json": "/llava/"}[name]
        srv.files[where + name] = path.read_bytes()

    repo = base / "repo"
    copy_worktree(REPO_ROOT, repo)
    params = merge(preset, overrides(srv.url("").rstrip("/")))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "tests@vlmpipe.invalid")
    git(repo, "config", "user.name", "vlmpipe tests")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "full preset, rehearsal overrides")
    downloads = base / "downloads"
    env = servers.clean_env(PYTHONPATH=str(repo), HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(base / "hf"),
                            HF_HOME=str(base / "hf-home"), TORCH_HOME=str(base / "torch"),
                            VLMPIPE_DOWNLOAD_DIR=str(downloads), DVC_SITE_CACHE_DIR=str(base / "dvc-site"),
                            GIT_TERMINAL_PROMPT="0")
    full = FullRepo(repo, env, params, archives, srv.log, downloads, build_seconds=build_s)
    t = time.monotonic()
    servers.run(["dvc", "repro"], cwd=repo, env=env, timeout=1200)
    # Each stage is one MLflow run (the default sqlite store in the repository): its duration.
    db = sqlite3.connect(repo / "mlflow.db")
    full.stage_seconds = {name: round((end - start) / 1000, 1) for name, start, end in db.execute(
        "select r.name, r.start_time, r.end_time from runs r order by r.start_time")}
    print(f"\nfull-preset rehearsal: stand-ins built in {build_s:.0f}s, dvc repro {time.monotonic() - t:.0f}s; "
          f"stage seconds {full.stage_seconds}")
    yield full
    if request.session.testsfailed == failed_before:
        shutil.rmtree(base, ignore_errors=True)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_every_stage_ran_and_the_pipeline_is_clean(full_repo):
    r = servers.run(["dvc", "status"], cwd=full_repo.path, env=full_repo.env)
    assert "up to date" in r.stdout + r.stderr, r.stdout + r.stderr
    lock = yaml.safe_load((full_repo.path / "dvc.lock").read_text())["stages"]
    assert set(STAGES) <= set(lock)
    # The pinned revisions are params of the stages that load those models.
    p = full_repo.params
    assert lock["train_phi2_qlora"]["params"]["params.yaml"]["phi2"]["revision"] == p["phi2"]["revision"]
    assert lock["train_gpt2_captioner"]["params"]["params.yaml"]["captioner"]["lm_revision"] == \
        p["captioner"]["lm_revision"]
    assert lock["precompute_embeddings"]["params"]["params.yaml"]["captioner.vision_encoder_revision"] == \
        p["captioner"]["vision_encoder_revision"]
    m = _json(full_repo.path / "reports/metrics.json")
    assert {"siglip", "vqa", "captioner", "chat"} <= set(m) and "i2t_r1" in m["siglip"]
    assert "cider" in m["captioner"] and "scene_right" not in m["captioner"]  # real COCO: no scene facts


LAUNCHED = ["train_siglip", "precompute_embeddings", "train_phi2_qlora", "train_gpt2_captioner", "train_gpt2_chat"]


def test_every_training_stage_ran_in_two_processes(full_repo):
    """dvc.lock records the launcher and two processes for each launched stage; each model was written
    once, by rank 0 (one curve, not clobbered or doubled); the speed files count both ranks."""
    root = full_repo.path
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    for stage in LAUNCHED:
        assert lock[stage]["cmd"] == f"python -m vlmpipe.loop.launch stages/{stage}.py"
        assert lock[stage]["params"]["params.yaml"]["launch.nproc_per_node"] == 2
    for name in ("siglip", "phi2_vlm", "captioner", "chat"):
        speed = _json(root / f"reports/speed/{name}.json")
        assert speed["world_size"] == 2 and speed["mfu"] > 0, speed
        rows = (root / f"reports/{name}/train_curve.csv").read_text().splitlines()
        assert len(rows) >= 2 and len(rows) - 1 == len({r.split(",")[0] for r in rows[1:]}), name


def test_llava_conversations_joined_with_coco_and_the_chat_model_continued_gpt2(full_repo):
    """The LLaVA file came through conversations.url, its record about an image COCO lacks was
    dropped and counted, a train2017 image was held out, and the chat model is GPT-2 continued."""
    root = full_repo.path
    s = _json(root / "data/conversations/summary.json")
    assert s["source"] == "llava_instruct_150k" and s["dropped"] == {"image not in data/coco": 1}, s
    assert s["train"] + s["val"] == N_COCO_TRAIN and s["val"] >= 1 and len(s["sha256"]) == 64
    chat = _json(root / "models/chat/model.json")
    cap = _json(root / "models/captioner/model.json")
    assert chat["kind"] == "chat" and chat["lm_source"] == "gpt2" and chat["encoder"] == cap["encoder"]
    # GPT-2's 1024 positions, less the preset's prefix tokens, are the conversation window.
    assert chat["max_prompt_tokens"] == 1024 - cap["prefix_tokens"]
    m = _json(root / "reports/metrics.json")["chat"]
    assert m["by_type"].keys() <= {"first", "later"} and m["nll_per_token"] > 0, m


def test_archives_came_through_the_mirror_params(full_repo):
    fetched = {path for path, _, status in full_repo.server_log if status == 200}
    assert fetched == {"/coco/annotations/annotations_trainval2017.zip", "/coco/zips/train2017.zip",
                       "/coco/zips/val2017.zip", "/cifar/cifar-10-python.tar.gz", "/llava/llava_instruct_150k.json"}
    coco = _json(full_repo.path / "data/coco/annotations/captions_val2017.json")
    assert len(coco["images"]) == N_COCO_VAL


def test_models_record_the_hub_revisions_they_came_from(full_repo):
    p, root = full_repo.params, full_repo.path
    vlm = _json(root / "models/phi2_vlm/model.json")
    assert vlm["lm_source"] == "microsoft/phi-2" and vlm["lm_revision"] == p["phi2"]["revision"]
    assert not (root / "models/phi2_vlm/lm").exists()  # the hub base is referenced, not copied
    cap = _json(root / "models/captioner/model.json")
    assert cap["lm_source"] == "gpt2" and cap["lm_revision"] == p["captioner"]["lm_revision"]
    assert cap["encoder"]["name"] == "openai/clip-vit-base-patch16"
    assert cap["encoder"]["revision"] == p["captioner"]["vision_encoder_revision"]
    sig = _json(root / "models/siglip/config.json")
    assert sig["backbone"] == "resnet50" and sig["image_size"] == 224
    assert sig["image_init"] == "ResNet50_Weights.IMAGENET1K_V2"
    # ... and in MLflow (the default sqlite store in the repository).
    db = sqlite3.connect(root / "mlflow.db")
    logged = dict(db.execute("select key, value from params where key in "
                             "('phi2.revision', 'captioner.lm_revision')").fetchall())
    assert logged == {"phi2.revision": p["phi2"]["revision"], "captioner.lm_revision": p["captioner"]["lm_revision"]}


def test_qa_projector_is_sized_for_phi2(full_repo):
    m = _json(full_repo.path / "reports/phi2_vlm/metrics.json")
    # ClipCap's K*H/2 hidden width would be 215.7M parameters for Phi-2 (H 2560, K 8).
    assert m["projector_params"] <= 25_000_000, m
    assert m["lora_params"] > 0
    print(f"\nfull preset: projector {m['projector_params'] / 1e6:.2f}M, LoRA {m['lora_params'] / 1e6:.2f}M "
          "(Phi-2 with 2 of 32 layers: the full model has 16x the LoRA parameters)")


def test_coco_is_stored_once(full_repo):
    """Download folder, data/coco and the DVC cache share the archives' inodes (cache type
    reflink,hardlink,copy; ingest hard-links an archive it keeps whole): nothing is stored twice."""
    root = full_repo.path
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["download_coco"]["outs"][0]
    manifest = root / ".dvc/cache/files/md5" / lock["md5"][:2] / lock["md5"][2:]
    cached = [root / ".dvc/cache/files/md5" / e["md5"][:2] / e["md5"][2:] for e in json.loads(manifest.read_text())]
    files = [*(full_repo.downloads / "coco2017").glob("*.zip"), *(root / "data/coco").rglob("*.*"), *cached]
    unique = {f.stat().st_ino: f.stat().st_size for f in files if f.is_file()}
    archives = sum(f.stat().st_size for f in (full_repo.downloads / "coco2017").glob("*.zip"))
    captions = sum(f.stat().st_size for f in (root / "data/coco/annotations").glob("*.json"))
    total = sum(unique.values())
    print(f"\nCOCO on disk (download folder + data/coco + DVC cache): {total} bytes in {len(unique)} inodes for "
          f"{archives} bytes of archives + {captions} bytes of extracted caption JSON ({total / archives:.3f}x)")
    assert total == archives + captions  # every byte once: the zips and the caption files, no copy of either
    for name in ("train2017.zip", "val2017.zip"):
        ws = (root / "data/coco" / name).stat()
        assert ws.st_ino == (full_repo.downloads / "coco2017" / name).stat().st_ino and ws.st_nlink == 3


def test_cli_captions_and_answers_a_jpeg(full_repo, tmp_path):
    from PIL import Image

    img = tmp_path / "photo.jpg"
    Image.new("RGB", (200, 150), (200, 30, 30)).save(img, quality=90)
    env = full_repo.env
    cap = servers.run(["python", "-m", "vlmpipe", "caption", str(img)], cwd=full_repo.path, env=env, timeout=600)
    path, text = cap.stdout.rstrip("\n").split("\t")
    assert path == str(img) and cap.stdout.count("\n") == 1
    ask = servers.run(["python", "-m", "vlmpipe", "ask", str(img), "what colour is it?"], cwd=full_repo.path,
                      env=env, timeout=600)
    assert ask.stdout.endswith("\n") and ask.stdout.count("\n") == 1
    chat = servers.run(["python", "-m", "vlmpipe", "chat", str(img), "--message", "What do you see?",
                        "--message", "What colour is it?"], cwd=full_repo.path, env=env, timeout=600)
    assert chat.stdout.count("\n") == 2, chat.stdout
