"""SigLIP: the train_siglip stage learns (zero-shot far above chance), save/load, towers, metrics."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlmpipe.core.errors import UserError
from vlmpipe.models.siglip.image_tower import ImageTower
from vlmpipe.data.image_texts import ImageTextPairs, image_texts
from vlmpipe.siglip.heldout import _recall_chance, retrieval_metrics
from vlmpipe.models.siglip.model import build_siglip, load_siglip
from vlmpipe.siglip.params import SiglipParams

REPO = Path(__file__).resolve().parent.parent


def _run_stage(name: str, cwd: Path, monkeypatch) -> None:
    import runpy

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # closed port: tracking skipped at once
    mod = runpy.run_path(str(REPO / "stages" / f"{name}.py"), run_name="stage")
    assert mod["main"]() == 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The train_siglip stage on 1500 generated shape images (150 per class), 8 epochs: ~30 s."""
    from vlmpipe.sources import qa
    from vlmpipe.sources import cifar

    d = tmp_path_factory.mktemp("siglip")
    cifar.write_synthetic(d / "data/cifar", train_per_class=150, test_per_class=20, seed=0)
    qa.write_qa_csv(d / "data/cifar_qa.csv", d / "data/cifar", seed=0)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["siglip"].update(embed_dim=128, text_width=64, text_layers=1, text_vocab_size=512)
    params["siglip"]["train"].update(epochs=8, batch_size=64, checkpoint_every=0, device="cpu")
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    mp, threads = pytest.MonkeyPatch(), torch.get_num_threads()
    # One thread: on a loaded 2-core machine two OpenMP threads thrash (this took 11 min instead of 40 s).
    torch.set_num_threads(1)
    try:
        _run_stage("train_siglip", d, mp)
    finally:
        mp.undo()
        torch.set_num_threads(threads)
    return d


def test_zero_shot_and_retrieval_beat_chance_by_far(trained):
    m = json.loads((trained / "reports/siglip/metrics.json").read_text())
    assert m["zero_shot_chance"] == pytest.approx(0.1)
    assert m["zero_shot_acc"] >= 0.35, m           # measured 0.63
    assert m["i2t_r1"] >= 4 * m["r1_chance"], m    # measured 0.25 vs 0.017
    assert m["t2i_r1"] >= 4 * m["r1_chance"], m
    assert m["i2t_r5"] > m["r5_chance"] and m["t2i_r5"] > m["r5_chance"]
    val = (trained / "reports/siglip/val_curve.csv").read_text().splitlines()
    assert len(val) == 1 + 8 and val[0].startswith("epoch,step,zero_shot_acc")


def test_saved_model_loads_in_one_call_and_reproduces_metrics(trained):
    from vlmpipe.data.cifar import load_split
    from vlmpipe.data.qa import read_qa_csv

    model = load_siglip(trained / "models/siglip")
    assert not model.training and len(model.config["class_prompts"]) == 10
    test = load_split(trained / "data/cifar", "test")
    te = image_texts(read_qa_csv(trained / "data/cifar_qa.csv", trained / "data/cifar"), "test", len(test), test.label_names)
    got = retrieval_metrics(model, test.images, test.labels, model.config["class_prompts"],
                            [c if ok else None for c, ok in zip(te.captions, te.complete)])
    want = json.loads((trained / "reports/siglip/metrics.json").read_text())
    for k, v in got.items():
        assert v == pytest.approx(want[k], abs=1e-6), k
    emb = model.encode_images(test.images[:3])
    assert emb.shape == (3, 128) and torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    # Uint8 images of another size are resized to the tower's 32 px.
    big = np.repeat(np.repeat(test.images[:2], 2, axis=1), 2, axis=2)
    assert model.encode_images(big).shape == (2, 128)


def test_load_siglip_errors_name_the_directory(tmp_path, trained):
    with pytest.raises(UserError, match=str(tmp_path / "nope")):
        load_siglip(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(trained / "models/siglip", broken)
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(UserError, match="no tokenizer"):
        load_siglip(broken)


def test_text_embedding_ignores_padding(trained):
    model = load_siglip(trained / "models/siglip")
    alone = model.encode_texts(["a photo of a circle"])
    padded = model.encode_texts(["a photo of a circle", "what colour is the shape on the dark background? red"])
    torch.testing.assert_close(alone[0], padded[0], atol=1e-5, rtol=0)


def test_frozen_hub_text_encoder(tmp_path):
    """A Hugging Face encoder by path: frozen, masked mean pooling, trainable projection, save/load."""
    from transformers import BertConfig, BertModel

    from vlmpipe.core.text import train_bpe_tokenizer

    texts = ["a photo of a circle", "a photo of a red square", "is it a polygon? yes", "how many corners? 4"] * 5
    tok = train_bpe_tokenizer(texts, 512)
    hub = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(hub)
    tok.save_pretrained(hub)

    model = build_siglip(SiglipParams(text_encoder=str(hub), embed_dim=16), texts)
    hf = model.text_tower.encoder.model
    assert not any(p.requires_grad for p in hf.parameters())
    assert model.text_tower.proj.weight.requires_grad
    model.train()
    assert not hf.training  # frozen: stays in eval mode (no dropout)
    tokens = model.tokenize(texts[:4])
    batch = {"images": torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8), **tokens,
             "text_ids": torch.arange(4)}
    model(batch)["loss"].backward()
    assert all(p.grad is None for p in hf.parameters())

    model.eval()
    torch.testing.assert_close(model.encode_texts(texts[:1])[0], model.encode_texts(texts[:4])[0], atol=1e-5, rtol=0)
    model.save(tmp_path / "saved")
    assert not any("encoder.model" in k for k in load_file(tmp_path / "saved/model.safetensors"))
    again = load_siglip(tmp_path / "saved")
    torch.testing.assert_close(again.encode_texts(texts[:2]), model.encode_texts(texts[:2]))


def test_image_towers(tmp_path, monkeypatch):
    small = ImageTower("resnet_small", 512)
    assert 0.7e6 < sum(p.numel() for p in small.parameters()) < 0.9e6
    small.eval()
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    r18 = ImageTower("resnet18", 64).eval()
    assert r18(torch.randn(2, 3, 64, 64)).shape == (2, 64)


def test_imagenet_weights_come_from_the_torch_cache(tmp_path, monkeypatch):
    """Pre-placed as a user's earlier run (or a test) leaves them: loaded with no network at all."""
    from torchvision.models import resnet18

    from vlmpipe.models.siglip import image_tower

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    ref = resnet18()
    dest = image_tower.weights_file("resnet18")
    assert dest.parent == tmp_path / "hub" / "checkpoints"
    dest.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), dest)
    tower = ImageTower("resnet18", 64, pretrained=True)
    torch.testing.assert_close(tower.trunk.conv1.weight, ref.conv1.weight)


def test_imagenet_weights_are_downloaded_and_checked(tmp_path, monkeypatch, file_server):
    """A missing file is fetched once into $TORCH_HOME and checked against the sha256 prefix in its
    name (torch.hub's convention); a file that does not match is deleted with a clear error."""
    import hashlib
    import io
    from types import SimpleNamespace

    from vlmpipe.models.siglip import image_tower

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)
    data = buf.getvalue()
    good = f"/resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    file_server.files[good] = data
    monkeypatch.setitem(image_tower.IMAGENET_WEIGHTS, "resnet18", SimpleNamespace(url=file_server.url(good)))
    path = image_tower.fetch_weights("resnet18")
    assert path == tmp_path / "hub" / "checkpoints" / good[1:] and path.read_bytes() == data
    image_tower.fetch_weights("resnet18")
    assert len(file_server.log) == 1  # cached: not fetched again
    file_server.files["/resnet18-00000000.pth"] = data
    monkeypatch.setitem(image_tower.IMAGENET_WEIGHTS, "resnet18",
                        SimpleNamespace(url=file_server.url("/resnet18-00000000.pth")))
    with pytest.raises(UserError, match="does not match the sha256 prefix 00000000"):
        image_tower.fetch_weights("resnet18")
    assert not (tmp_path / "hub" / "checkpoints" / "resnet18-00000000.pth").exists()


def test_imagenet_weights_offline_is_one_line_naming_the_file(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from vlmpipe.models.siglip import image_tower

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # A host that does not resolve, as on an offline machine (".invalid" never resolves).
    monkeypatch.setitem(image_tower.IMAGENET_WEIGHTS, "resnet50",
                        SimpleNamespace(url="https://weights.invalid/models/resnet50-11ad3fa6.pth"))
    with pytest.raises(UserError) as e:
        image_tower.fetch_weights("resnet50")
    msg = str(e.value)
    assert msg.startswith("siglip.pretrained: ") and "cannot reach the server" in msg and "\n" not in msg
    assert f"put resnet50-11ad3fa6.pth in {tmp_path / 'hub' / 'checkpoints'}" in msg


class _Stub:
    """encode_* return one-hot class vectors: a perfect model for the metrics."""

    def __init__(self, labels_of_texts: dict[str, int]) -> None:
        self.t = labels_of_texts

    def encode_images(self, images):
        return torch.nn.functional.one_hot(torch.as_tensor(images), 4).float()

    def encode_texts(self, texts):
        return torch.nn.functional.one_hot(torch.tensor([self.t[t] for t in texts]), 4).float()


def test_retrieval_metrics_and_chance():
    assert _recall_chance(np.array([1, 1]), 10, 1) == pytest.approx(0.1)
    assert _recall_chance(np.array([1]), 10, 5) == pytest.approx(0.5)
    assert _recall_chance(np.array([2]), 4, 1) == pytest.approx(0.5)
    prompts = ["p0", "p1", "p2", "p3"]
    labels = np.array([0, 1, 2, 3, 0, 1])
    captions = ["c0", "c1", "c2", "c3", "c0", None]  # the last image is left out of retrieval
    stub = _Stub({**{p: i for i, p in enumerate(prompts)}, **{f"c{i}": i for i in range(4)}})
    m = retrieval_metrics(stub, labels, labels, prompts, captions)
    assert m["zero_shot_acc"] == 1 and m["zero_shot_chance"] == 0.25
    assert m["i2t_r1"] == m["t2i_r1"] == 1.0
    # 5 pairs, caption c0 shared by 2: chance R@1 = mean(2/5, 1/5, 1/5, 1/5, 2/5)
    assert m["r1_chance"] == pytest.approx((2 + 1 + 1 + 1 + 2) / 25)


def test_text_choice_is_deterministic_per_epoch():
    from vlmpipe.core.text import train_bpe_tokenizer

    prompts = [f"a photo of a {c}" for c in "abc"]
    caps = ["a photo of a red a", None, "a photo of a blue c"]
    qa = [["q1 x", "q2 y"], [], ["q3 z"]]
    tok = train_bpe_tokenizer(prompts + qa[0] + qa[2] + [c for c in caps if c], 512)
    images = np.zeros((3, 32, 32, 3), np.uint8)
    big = ImageTextPairs(np.zeros((300, 32, 32, 3), np.uint8), np.arange(300) % 3, prompts, caps * 100, qa * 100, tok, 16, 0)
    a = ImageTextPairs(images, np.arange(3), prompts, caps, qa, tok, 16, seed=0)
    b = ImageTextPairs(images, np.arange(3), prompts, caps, qa, tok, 16, seed=0)
    for e in range(3):
        a.set_epoch(e), b.set_epoch(e)
        assert a.pick == b.pick
    big.set_epoch(0)
    picked = [big.vocab[t] for i, t in enumerate(big.pick) if i % 3 != 1]  # images with caption and Q/A
    assert 0.3 < np.mean([t in prompts for t in picked]) < 0.5  # PROMPT_P = 0.4
    batch = a.collate([a[0], a[1], a[2]])
    assert batch["images"].shape == (3, 32, 32, 3) and batch["input_ids"].shape[0] == 3
    assert (batch["attention_mask"].sum(1) > 0).all()
