"""The ClipCap-style captioner: data/labels, validation loss, decoding, save/load, CLI.

Small fixtures: a tiny GPT-2 (hidden 32) and a projector trained through the
shared loop on a handful of one-shape scenes with random "cached" features.
"""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmpipe.face import api as cli
from vlmpipe.captioner import heldout
from vlmpipe.loop import tiny_base
from vlmpipe.captioner import stage as train_captioner
from vlmpipe.data.captions import CaptionDataset
from vlmpipe.models import captioner as C
from vlmpipe.core.params import TinyLMParams, TrainParams

REPO = Path(__file__).resolve().parents[1]
FEAT_DIM, REGIONS, PREFIX = 16, 5, 5
N_IMAGES = 16


def _captions(n: int, seed: int = 0) -> list[list[str]]:
    from vlmpipe.sources.shapes import random_scene, scene_captions

    rng = np.random.default_rng(seed)
    return [scene_captions(random_scene(rng, 64), rng) for _ in range(n)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Captions, features (distinct per image) and a tiny GPT-2 built on the captions."""
    caps = _captions(N_IMAGES)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(N_IMAGES, REGIONS, FEAT_DIM, generator=g).half()
    lm_dir = tmp_path_factory.mktemp("lm") / "tiny"
    tiny_base.build("gpt2", TinyLMParams(vocab_size=512, hidden_size=32, layers=1, heads=2, warmup_steps=0),
                             [c for cs in caps for c in cs], lm_dir, seed=0)
    return caps, feats, lm_dir


def _dataset(model, feats, caps):
    return CaptionDataset(feats, caps, model.tokenizer, model.config.max_new_tokens)


def _new_model(lm_dir, freeze_lm=False, max_tokens=40):
    return C.build_captioner(lm_dir, encoder={"name": "test-encoder"}, feature_dim=FEAT_DIM, regions=REGIONS,
                             prefix_tokens=PREFIX, freeze_lm=freeze_lm, beam_size=3,
                             max_caption_tokens=max_tokens, seed=0)


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """A captioner trained with vlmpipe.loop.train.fit; its report dir and saved dir."""
    from vlmpipe.loop.train import TrainTask, fit

    caps, feats, lm_dir = world
    root = tmp_path_factory.mktemp("trained")
    model = _new_model(lm_dir)
    train = _dataset(model, feats, caps)
    val = _dataset(model, feats[:4], caps[:4])
    task = TrainTask("captioner", model, train, model.pack,
                     evaluate=heldout.caption_evaluator(val, feats[:4], caps[:4], show=1))
    cfg = TrainParams(epochs=12, batch_size=16, lr=1e-2, weight_decay=0.0, warmup_ratio=0.05,
                      checkpoint_every=0, device="cpu")
    fit(task, cfg, seed=0, ckpt_dir=root / "ckpt", report_dir=root / "reports", identity={"test": 1})
    model.eval()
    model.save(root / "model")
    return model, root


# --- data and labels ------------------------------------------------------------------


def test_labels_end_in_eos_and_mask_prefix_and_padding(world):
    caps, feats, lm_dir = world
    model = _new_model(lm_dir, max_tokens=12)
    caps = [list(c) for c in caps[:3]]
    caps[0][0] = " ".join(["a large red circle"] * 20)  # longer than max_caption_tokens: cut, still ends in EOS
    ds = _dataset(model, feats[:3], caps)
    assert len(ds) == 15  # every reference caption is a sample
    batch = model.collate([ds[i] for i in range(len(ds))])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    eos = model.tokenizer.eos_token_id
    assert labels.shape == ids.shape  # the prefix is the model's, outside the text
    assert torch.equal(labels == -100, mask == 0)  # exactly the padding is masked
    assert int(mask.sum(1).max()) == ids.shape[1] == 12  # dynamic padding, to the longest (cut) caption
    for row, n in zip(labels, mask.sum(1).tolist()):
        assert row[n - 1] == eos and (row[: n - 1] != eos).all()
    # The loss counts exactly the caption tokens + EOS.
    out = model(batch)
    assert out["targets"] == out["tokens"] == int(mask.sum()) and out["samples"] == 15 and out["loss"].item() > 0
    # ... and is the mean cross-entropy of those tokens, each predicted from what comes before it.
    logits, lab = model.text_logits(batch)
    ref = torch.nn.functional.cross_entropy(logits.float()[lab != -100], lab[lab != -100])
    torch.testing.assert_close(out["loss"], ref)


def test_the_loss_runs_the_lm_head_on_the_targets_alone_and_matches_the_lms_own_logits(world):
    """The loss runs GPT-2's body, then its head on the target rows only: the same loss and gradients as
    the LM's own forward (every position's logits) read at the targets."""
    _, feats, lm_dir = world
    model = _new_model(lm_dir)
    assert model._body_and_head is not None  # GPT-2: logits are head(body(x)), so the short path is taken
    ds = _dataset(model, feats[:3], _captions(3))
    batch = model.collate([ds[i] for i in range(6)])
    batch["labels"][:, :3] = -100  # some positions without a target, as a prompt's are

    def loss_and_grads():
        model.zero_grad()
        out = model(batch)
        out["loss"].backward()
        return out, [q.grad.clone() for q in model.parameters() if q.grad is not None]

    fast, fast_grads = loss_and_grads()
    model.head_on_targets = False  # as an LM with its own logits: the whole forward, then the rows
    assert model._split_head() is None
    whole, whole_grads = loss_and_grads()
    torch.testing.assert_close(fast["loss"], whole["loss"])
    assert len(fast_grads) == len(whole_grads) > 0
    for a, b in zip(fast_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert int(fast["targets"]) == int(whole["targets"]) == int((batch["labels"] != -100).sum())


def test_a_packed_batch_gives_the_padded_batchs_loss_and_gradients(world):
    """Training packs several captions a row (``PrefixLM.pack``): the loss, counts and gradients of the same
    captions padded one a row, and fewer FLOPs."""
    from test_packing import assert_packed_equals_padded

    _, feats, lm_dir = world
    model = _new_model(lm_dir)
    ds = _dataset(model, feats[:8], _captions(8, seed=1))
    examples = [ds[i] for i in range(len(ds))]
    assert_packed_equals_padded(model, examples)
    assert model.train_flops(model.pack(examples)) < model.train_flops(model.collate(examples))


def test_freeze_lm_trains_projector_only(world):
    _, _, lm_dir = world
    model = _new_model(lm_dir, freeze_lm=True)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"projector"}
    model.train()
    assert not model.lm.training


def test_projector_maps_each_region_to_its_own_tokens():
    """With R regions each region's features make its own K/R prefix tokens (the same MLP for every region,
    a learned position per token): a change in one quadrant moves that quadrant's tokens only."""
    from vlmpipe.models.lm.projector import PrefixProjector

    torch.manual_seed(0)
    proj = PrefixProjector(FEAT_DIM, REGIONS, 10, 8)
    feats = torch.randn(3, REGIONS, FEAT_DIM)
    out = proj(feats)
    assert out.shape == (3, 10, 8)
    moved = feats.clone()
    moved[:, 2] += 1.0  # region 2: tokens 4 and 5
    changed = (proj(moved) - out).abs().amax(dim=(0, 2)) > 0
    assert changed.tolist() == [False] * 4 + [True] * 2 + [False] * 4
    # Two regions with the same features still give different tokens: the position tells them apart.
    same = proj(feats[:, :1].expand(-1, REGIONS, -1))
    assert not torch.allclose(same[:, 0], same[:, 2])
    # One region is ClipCap's MLP as it was: no position vectors, the K tokens from one MLP.
    one = PrefixProjector(FEAT_DIM, 1, 4, 8)
    assert one.position is None and one.net[-1].out_features == 4 * 8


def test_prefix_tokens_must_split_evenly_over_regions():
    from vlmpipe.captioner.params import CaptionerParams
    from vlmpipe.core.errors import UserError

    with pytest.raises(UserError, match=r"captioner.prefix_tokens: must be a multiple of regions \(5\)"):
        CaptionerParams(regions=5, prefix_tokens=4).validate("captioner")


# --- training through the shared loop ----------------------------------------------------


def test_validation_loss_nonzero_and_changes(trained):
    _, root = trained
    rows = list(csv.DictReader(open(root / "reports" / "val_curve.csv")))
    losses = [float(r["val_loss"]) for r in rows]
    assert len(losses) == 12
    assert all(v > 0 for v in losses)
    assert len(set(losses)) == len(losses)  # changes every epoch
    assert losses[-1] < 0.5 * losses[0]


def test_generation_stops_before_limit(trained, world):
    model, _ = trained
    _, feats, _ = world
    limit = 40
    for beam in (1, 3):
        ids = model.generate(feats, num_beams=beam, max_new_tokens=limit)  # without the EOS that ended them
        assert all(len(x) < limit and model.tokenizer.eos_token_id not in x for x in ids), [len(x) for x in ids]
    caps = model.caption(feats[:4], beam_size=3)
    assert all(c and "<|" not in c for c in caps)


def test_generation_is_deterministic_and_batch_independent(trained, world):
    model, _ = trained
    _, feats, _ = world
    assert model.caption(feats, beam_size=3) == model.caption(feats, beam_size=3)
    # Greedy = beam 1; a batch gives the same captions as one image at a time.
    one_by_one = [model.caption(feats[i:i + 1], beam_size=1)[0] for i in range(4)]
    assert model.caption(feats[:4], beam_size=1) == one_by_one


def test_save_load_identical_captions(trained, world):
    model, root = trained
    _, feats, _ = world
    loaded = C.load_captioner(root / "model")
    assert loaded.config.encoder == {"name": "test-encoder"}
    for beam in (1, 3):
        assert loaded.caption(feats, beam_size=beam) == model.caption(feats, beam_size=beam)
    # No frozen vision weights anywhere in the output: projector + LM + tokenizer + config.
    names = {p.name for p in (root / "model").rglob("*") if p.is_file()}
    assert {"model.json", "projector.safetensors", "model.safetensors"} <= names
    assert not any(n.endswith((".pt", ".bin", ".pth")) for n in names)


def test_load_missing_model_is_user_error(tmp_path):
    from vlmpipe.core.errors import UserError

    with pytest.raises(UserError, match="no trained captioner here"):
        C.load_captioner(tmp_path / "nothing")


# --- the stage's library path and the command line --------------------------------------------


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Tiny COCO + an (untrained) SigLIP + its cached region features -> train_captioner."""
    from vlmpipe.data import features as embeddings
    from vlmpipe.data import coco
    from vlmpipe.sources import coco as coco_source
    from vlmpipe.models.siglip.model import build_siglip
    from vlmpipe.captioner.params import CaptionerParams
    from vlmpipe.sources.params import CocoParams
    from vlmpipe.siglip.params import SiglipParams

    root = tmp_path_factory.mktemp("pipeline")
    coco_source.build(CocoParams(synthetic_train_images=24, synthetic_val_images=6, image_size=64), 0, root / "data/coco")
    sp = SiglipParams(embed_dim=32, text_width=32, text_layers=1, text_vocab_size=512)
    torch.manual_seed(0)
    tower = build_siglip(sp, ["a red circle", "a blue square"]).eval()
    tower.save(root / "models/siglip")
    ident = embeddings.siglip_identity(root / "models/siglip")
    fn = embeddings.siglip_encoder(tower, REGIONS)
    for split in ("train", "val"):
        data = coco.CocoCaptions(root / "data/coco", split)
        feats = embeddings.embed_sharded(fn, data.ids, data.image, batch_size=32, desc=split)
        embeddings.save(root / "data/embeddings", "coco", split, data.ids, feats, ident)
    cp = CaptionerParams(regions=REGIONS, prefix_tokens=PREFIX, max_caption_tokens=12, beam_size=2,
                         tiny=TinyLMParams(vocab_size=512, hidden_size=32, layers=1, heads=2, warmup_steps=0),
                         train=TrainParams(epochs=2, batch_size=24, lr=3e-3, checkpoint_every=0, device="cpu"))
    res = train_captioner.run_stage(cp, seed=0, coco_root=root / "data/coco", embeddings_root=root / "data/embeddings",
                            siglip_dir=root / "models/siglip", out_dir=root / "models/captioner",
                            ckpt_dir=root / "models/checkpoints/captioner", report_dir=root / "reports/captioner",
                            show=1)
    val = coco.CocoCaptions(root / "data/coco", "val")
    img = root / "scene.png"
    val.image(val.ids[0]).save(img)
    return root, res, img


def test_train_captioner_writes_model_and_curves(pipeline):
    root, res, _ = pipeline
    rows = list(csv.DictReader(open(root / "reports/captioner/val_curve.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and all(float(r["val_loss"]) > 0 for r in rows)
    assert res.tokens_per_s > 0
    model = C.load_captioner(root / "models/captioner")
    enc = model.config.encoder
    assert enc["name"] == "siglip" and enc["path"] == "../siglip" and len(enc["hash"]) == 16
    assert model.config.lm_source == "tiny" and model.config.num_beams == 2
    # No encoder weights in the captioner's output (only the identity above).
    from safetensors import safe_open

    for f in (root / "models/captioner").rglob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            assert not any("image_tower" in k or "trunk" in k for k in st.keys())


def test_caption_files_matches_cached_features(pipeline):
    """New images are featurized exactly like the cache: same captions from the file and the cache."""
    from vlmpipe.data import features as embeddings

    root, _, img = pipeline
    model = C.load_captioner(root / "models/captioner")
    cache = embeddings.load(root / "data/embeddings", "coco", "val")
    from_cache = model.caption(cache.embeddings[:1].float())
    assert cli.caption_files(root / "models/captioner", [img]) == from_cache


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "vlmpipe", "caption", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow  # the CLI in subprocesses
def test_cli_captions_and_missing_file_error(pipeline, tmp_path):
    root, _, img = pipeline
    model = str(root / "models/captioner")
    out = _cli([str(img), str(img), "--model", model, "--beam-size", "1"], cwd=REPO)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{img}\t") and line.split("\t")[1] for line in lines)
    assert lines[0] == lines[1]  # deterministic
    # What the API says (the demo, the registry and predict are held to the API).
    assert lines[0].split("\t")[1] == cli.caption_files(model, [img], beam_size=1, device="cpu")[0]
    missing = tmp_path / "nope.png"
    bad = _cli([str(img), str(missing), "--model", model], cwd=REPO)
    assert bad.returncode == 2 and bad.stdout == ""
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == f"error: {missing}: image file not found"


def test_unreadable_image_is_user_error(pipeline, tmp_path):
    from vlmpipe.core.errors import UserError

    root, _, img = pipeline
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image")
    with pytest.raises(UserError, match=f"^{garbage}: cannot read image"):
        cli.caption_files(root / "models/captioner", [img, garbage])


def test_the_evaluation_checks_each_caption_against_its_own_scene(pipeline, tmp_path, monkeypatch):
    """evaluate_captioner's scene score: the share of held-out scenes whose caption is entirely right,
    beside the constant caption's; absent where data/coco has no scene facts (real COCO)."""
    import shutil

    from vlmpipe.captioner import evaluate as ev
    from vlmpipe.data.coco import CocoCaptions

    root, _, _ = pipeline
    model, feats, coco = root / "models/captioner", root / "data/embeddings", root / "data/coco"
    untrained, _ = ev.evaluate_captioner(model, feats, coco, meteor=False)
    scene_keys = {"scene_right", "scene_shapes_right", "baseline_scene_right", "baseline_scene_shapes_right"}
    assert scene_keys <= set(untrained) and all(0 <= untrained[k] <= 1 for k in scene_keys)
    assert untrained["baseline_scene_right"] < 1  # one constant caption cannot be right about six scenes

    val = CocoCaptions(coco, "val")

    def saying(caption_of):  # the model, captioning the split's images (in their order) as told
        load = ev.load_captioner

        def loaded(*a, **kw):
            m = load(*a, **kw)
            m.caption = lambda f: [caption_of(i) for i in val.ids[:len(f)]]
            return m
        return loaded

    monkeypatch.setattr(ev, "load_captioner", saying(lambda i: val.captions(i)[-1]))
    own, examples = ev.evaluate_captioner(model, feats, coco, meteor=False)
    assert [g for _, g, _ in examples] == [val.captions(i)[-1] for i in val.ids]
    assert own["scene_right"] == own["scene_shapes_right"] == 1.0
    assert own["baseline_scene_right"] == untrained["baseline_scene_right"]
    nxt = dict(zip(val.ids, val.ids[1:] + val.ids[:1]))
    monkeypatch.setattr(ev, "load_captioner", saying(lambda i: val.captions(nxt[i])[-1]))
    assert ev.evaluate_captioner(model, feats, coco, meteor=False)[0]["scene_right"] < 1  # the neighbour's scene

    monkeypatch.undo()
    real = tmp_path / "coco"
    shutil.copytree(coco, real, ignore=shutil.ignore_patterns("scenes_*"))
    plain, _ = ev.evaluate_captioner(model, feats, real, meteor=False)
    assert not scene_keys & set(plain) and plain["cider"] == untrained["cider"]
