"""Cached embeddings: round trip, stale identity refused, batching, regions, encoders."""
from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import torch
from PIL import Image

from vlmpipe.data import features as E
from vlmpipe.core.errors import UserError
from vlmpipe.models.siglip.model import build_siglip
from vlmpipe.siglip.params import SiglipParams

ENC = {"name": "siglip", "hash": "0123456789abcdef"}


def test_round_trip(tmp_path):
    emb = torch.randn(4, 5, 8)
    path = E.save(tmp_path, "coco", "val", [42, 7, 9, 100], emb, ENC)
    assert path == tmp_path / "coco_val.safetensors"
    got = E.load(tmp_path, "coco", "val", expect_encoder=ENC)
    assert got.ids.tolist() == [42, 7, 9, 100] and got.regions == 5 and got.encoder == ENC
    assert got.embeddings.dtype == torch.float16 and got.embeddings.shape == (4, 5, 8)
    torch.testing.assert_close(got.embeddings.float(), emb.half().float())
    torch.testing.assert_close(got.embeddings[got.row(9)], emb[2].half())
    # [N, D] is stored as one region.
    E.save(tmp_path, "cifar", "test", [0, 1], torch.randn(2, 8), ENC)
    assert E.load(tmp_path, "cifar", "test").embeddings.shape == (2, 1, 8)
    assert not list(tmp_path.glob(".*"))  # no temporary leftovers


def test_same_embeddings_give_the_same_file_bytes(tmp_path):
    """DVC hashes output files: equal embeddings must make equal files (safetensors writes several
    metadata entries in a per-run hash-map order; measured: 10 saves, 10 different files)."""
    emb = torch.randn(3, 2, 8)
    a = E.save(tmp_path / "a", "coco", "val", [1, 2, 3], emb, ENC).read_bytes()
    for _ in range(5):
        assert E.save(tmp_path / "b", "coco", "val", [1, 2, 3], emb, ENC).read_bytes() == a


def test_stale_or_missing_cache_is_refused(tmp_path):
    E.save(tmp_path, "cifar", "train", [0, 1], torch.randn(2, 1, 8), ENC)
    with pytest.raises(UserError, match="stale cache"):
        E.load(tmp_path, "cifar", "train", expect_encoder={"name": "siglip", "hash": "ffffffffffffffff"})
    with pytest.raises(UserError, match="stale cache"):
        E.load(tmp_path, "cifar", "train", expect_encoder={**ENC, "name": "openai/clip-vit-base-patch16"})
    with pytest.raises(UserError, match="cifar_test.safetensors: no cached embeddings"):
        E.load(tmp_path, "cifar", "test")
    (tmp_path / "coco_val.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="unreadable"):
        E.load(tmp_path, "coco", "val")
    with pytest.raises(ValueError, match="unique"):
        E.save(tmp_path, "cifar", "train", [0, 0], torch.randn(2, 1, 8), ENC)


def test_embed_images_batches_without_gradients():
    seen = []
    w = torch.nn.Parameter(torch.ones(()))

    def fn(batch):
        seen.append(len(batch))
        out = torch.tensor(np.stack(batch), dtype=torch.float32) * w
        assert not out.requires_grad
        return out

    out = E.embed_images(fn, (np.full(3, i) for i in range(10)), batch_size=4, total=10)
    assert seen == [4, 4, 2]
    assert out[:, 0].tolist() == list(range(10))
    # One process: the sharded helper is the plain one, in id order.
    torch.testing.assert_close(E.embed_sharded(fn, [3, 1, 2], lambda i: np.full(3, i), 2, desc="t").float(),
                               torch.tensor([[3.0] * 3, [1.0] * 3, [2.0] * 3]))


@pytest.fixture(scope="module")
def siglip():
    torch.manual_seed(0)
    return build_siglip(SiglipParams(embed_dim=16, text_width=16, text_layers=1), ["a photo of a circle"] * 4).eval()


def test_siglip_encoder_regions_and_identity(tmp_path, siglip):
    rng = np.random.default_rng(0)
    scene = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    five = E.siglip_encoder(siglip, 5)([Image.fromarray(scene), scene])
    assert five.shape == (2, 5, 16)
    torch.testing.assert_close(five[0], five[1])
    torch.testing.assert_close(five[0, 0], siglip.encode_images(scene[None])[0])  # resized by the model
    torch.testing.assert_close(five[0, 2], siglip.encode_images(scene[None, :32, 32:])[0])  # top right
    torch.testing.assert_close(five[0, 3], siglip.encode_images(scene[None, 32:, :32])[0])  # bottom left
    assert E.siglip_encoder(siglip, 1)([scene]).shape == (1, 1, 16)

    siglip.save(tmp_path / "siglip")
    assert E.siglip_identity(tmp_path / "siglip") == E.encoder_identity("siglip", siglip.image_tower)
    before = E.encoder_identity("siglip", siglip.image_tower)
    with torch.no_grad():
        siglip.image_tower.proj.bias.add_(1e-3)
    assert E.encoder_identity("siglip", siglip.image_tower)["hash"] != before["hash"]
    with pytest.raises(UserError, match="run `dvc repro train_siglip`"):
        E.siglip_identity(tmp_path / "missing")


def test_clip_encoder_pooled_output(tmp_path):
    """The CLIP path with a tiny randomly initialised CLIP vision model saved locally (no network)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16, projection_dim=8)
    CLIPVisionModel(cfg).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "clip")
    fn, ident = E.clip_encoder(str(tmp_path / "clip"), 5, torch.device("cpu"))
    out = fn([np.zeros((64, 48, 3), np.uint8), np.full((40, 40, 3), 200, np.uint8)])
    assert out.shape == (2, 5, 24)  # the pooled output: hidden_size wide (768 for ViT-B/16)
    assert ident["name"] == str(tmp_path / "clip") and len(ident["hash"]) == 16
    with pytest.raises(UserError, match="captioner.vision_encoder"):
        E.clip_encoder(str(tmp_path / "nope"), 1, torch.device("cpu"))


def test_one_image_path_from_training_to_every_face(tmp_path, siglip, monkeypatch):
    """The same picture (not the model's size, not square) through SigLIP's training forward, the feature
    cache's encoder, the CLI's file reader, the demo's upload decoder and the MLflow pyfunc reaches the
    image tower as the same tensor: each goes through ``SigLIP.preprocess`` and nothing resizes before it."""
    import base64
    import types

    import pandas as pd

    from vlmpipe.face import images as face_images, limits
    from vlmpipe.face.pyfunc_model import VlmpipeModel
    from vlmpipe.models.siglip.model import SigLIP

    rng = np.random.default_rng(3)
    picture = rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)
    png = tmp_path / "picture.png"
    Image.fromarray(picture).save(png)
    seen = []
    real = SigLIP.preprocess

    def spy(self, images):
        out = real(self, images)
        seen.append(out.detach().clone())
        return out
    monkeypatch.setattr(SigLIP, "preprocess", spy)

    siglip.eval()(dict(images=torch.from_numpy(picture[None]), text_ids=torch.zeros(1, dtype=torch.long),
                       **siglip.tokenize(["a photo of a circle"])))                       # training forward
    E.siglip_encoder(siglip, 1)([picture])                                                # feature cache
    E.siglip_encoder(siglip, 1)([face_images.read_image(png)])                            # CLI (`ask`, `caption`)
    E.siglip_encoder(siglip, 1)([limits.decode_image(png.read_bytes())])                   # demo upload
    siglip.save(tmp_path / "siglip")
    pyfunc = VlmpipeModel()
    pyfunc.load_context(types.SimpleNamespace(model_config={"kind": "siglip"},
                                              artifacts={"model": str(tmp_path / "siglip")}))
    monkeypatch.setattr(SigLIP, "preprocess", spy)  # the pyfunc loaded its own copy: same class
    pyfunc.predict(None, pd.DataFrame({"image": [base64.b64encode(png.read_bytes()).decode()]}))  # MLflow
    assert len(seen) == 5
    for other in seen[1:]:
        assert torch.equal(seen[0], other)
    assert seen[0].shape == (1, 3, siglip.image_size, siglip.image_size)


def test_a_coco_image_that_cannot_be_read_leaves_every_feature_file_as_it_was(tmp_path, siglip, tiny_cifar,
                                                                             tiny_coco):
    """precompute_embeddings embeds CIFAR, then COCO. A COCO image that cannot be read (found after the
    CIFAR features are computed) must leave the earlier output folder whole: no new CIFAR files beside
    old COCO ones. The folder is replaced at once, at the end."""
    import copy
    import shutil
    import types
    import zipfile

    from vlmpipe.captioner.params import CaptionerParams
    from vlmpipe.data.coco import CocoCaptions
    from vlmpipe.embeddings.params import EmbeddingsParams
    from vlmpipe.embeddings.stage import embed_all

    siglip = copy.deepcopy(siglip)  # changed below; the module's stays as it is
    siglip.save(tmp_path / "siglip")
    coco = tmp_path / "coco"
    shutil.copytree(tiny_coco, coco)
    p = types.SimpleNamespace(embeddings=EmbeddingsParams(batch_size=8, device="cpu"),
                              captioner=CaptionerParams(regions=1))
    out = tmp_path / "embeddings"
    run = functools.partial(embed_all, p, 0, torch.device("cpu"), siglip_dir=tmp_path / "siglip",
                            cifar_root=tiny_cifar, coco_root=coco, out=out)
    run()
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    assert sorted(before) == ["cifar_test.safetensors", "cifar_train.safetensors", "coco_train.safetensors",
                              "coco_val.safetensors"]
    torch.manual_seed(1)  # another SigLIP: every feature would change
    with torch.no_grad():
        for w in siglip.parameters():
            w.add_(torch.randn_like(w))
    siglip.save(tmp_path / "siglip")
    val = CocoCaptions(coco, "val")
    member = val.member(val.ids[-1])
    with zipfile.ZipFile(tiny_coco / "val2017.zip") as zin, zipfile.ZipFile(coco / "val2017.zip", "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, b"not a JPEG" if info.filename == member else zin.read(info))
    with pytest.raises(UserError, match=re.escape(f"{coco / 'val2017.zip'}: member {member}: cannot read image")):
        run()
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
