"""``python -m vlmpipe export`` (vlmpipe/face/export.py) on tiny untrained models: the QA model's LoRA merged
into its dequantised base answers as the adapter model does, every export loads on its own (nothing points
outside it), and a refused or failed export writes nothing."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

import untrained
from vlmpipe.__main__ import main
from vlmpipe.core.errors import UserError
from vlmpipe.face import api, export
from vlmpipe.models.captioner import load_captioner
from vlmpipe.models.qa_model import load_qa_model

QUESTIONS = ["what colour is the circle?", "is it red?", "what shape is it?"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The untrained models, and ``models/phi2_lora``: the QA model with random LoRA B matrices (an untrained
    adapter is zero, and merging zero would prove nothing)."""
    root, images = untrained.build(tmp_path_factory.mktemp("export"))
    qa = load_qa_model(root / "models/phi2_vlm", "cpu")
    torch.manual_seed(1)
    for name, p in qa.lm.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    qa.save(root / "models/phi2_lora")
    return root, images


def batch(model, image, question: str) -> dict:
    ids = model.tokenizer(f"Question: {question}\nAnswer:")["input_ids"]
    t = torch.tensor([ids])
    return {"input_ids": t, "attention_mask": torch.ones_like(t), "labels": t,
            "feats": api.featurize(model, [api.read_image(image)])}


def ask_all(model, images) -> list[str]:
    """Every question about every image, in one batch."""
    feats = api.featurize(model, [api.read_image(im) for im in images]).repeat_interleave(len(QUESTIONS), 0)
    return model.answer(feats, QUESTIONS * len(images), [[]] * len(feats))


def test_qa_export_is_the_adapter_model_merged_and_self_contained(built, tmp_path):
    root, images = built
    src = tmp_path / "src"
    shutil.copytree(root / "models", src / "models")  # exported, then deleted: the export must stand alone
    out = tmp_path / "exports" / "qa"  # its parent does not exist yet
    adapter = load_qa_model(src / "models/phi2_lora", "cpu")
    with torch.no_grad():
        want = [adapter.text_logits(batch(adapter, images[0], q))[0] for q in QUESTIONS]
        with adapter.lm.disable_adapter():
            bare = adapter.text_logits(batch(adapter, images[0], QUESTIONS[0]))[0]
    answers = ask_all(adapter, images)
    assert main(["export", str(src / "models/phi2_lora"), str(out), "--device", "cpu"]) == 0
    shutil.rmtree(src)

    cfg = json.loads((out / "model.json").read_text())
    assert cfg["extra"]["load_in_4bit"] is False and cfg["extra"]["merged"]["dequantized_layers"] > 0
    assert cfg["encoder"]["path"] == "siglip" and (out / "siglip/model.safetensors").is_file()
    assert not (out / "adapter").exists()
    assert "quantization_config" not in json.loads((out / "lm/config.json").read_text())
    merged = load_qa_model(out, "cpu")  # the trained model's loader, as ask, chat and serve use
    assert not any("lora" in n for n, _ in merged.lm.named_modules())
    with torch.no_grad():
        got = [merged.text_logits(batch(merged, images[0], q))[0] for q in QUESTIONS]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert (got[0] - bare).abs().max() > 1e-2  # the LoRA delta is in the merged weights
    assert ask_all(merged, images) == answers

    card = (out / "README.md").read_text()
    for f in ("lm/model.safetensors", "projector.safetensors", "siglip/model.safetensors"):
        assert f"| `{f}` | `{hashlib.sha256((out / f).read_bytes()).hexdigest()}` |" in card
    assert "lies in no DVC repository" in card  # a tmp folder: no dvc.yaml above it

    (out / "lm/config.json").unlink()  # a damaged export: one line naming the folder
    with pytest.raises(UserError, match=r"lm: missing \(the merged language model\); export the model again"):
        load_qa_model(out, "cpu")


@pytest.mark.parametrize("name, loader", [("captioner", load_captioner), ("chat", None)])
def test_captioner_and_chat_export_as_they_are_with_their_encoder(built, tmp_path, name, loader):
    root, images = built
    out = tmp_path / name
    export.export(root / "models" / name, out, "cpu")
    for f in (root / "models" / name).rglob("*"):
        if f.is_file() and f.name != "model.json":
            assert (out / f.relative_to(root / "models" / name)).read_bytes() == f.read_bytes()
    assert json.loads((out / "model.json").read_text())["encoder"]["path"] == "siglip"
    if loader is not None:
        feats_img = [api.read_image(p) for p in images]
        assert api.caption_images(loader(out), feats_img) == \
            api.caption_images(loader(root / "models" / name), feats_img)
    else:
        from vlmpipe.models.chat_model import load_chat_model
        a, b = load_chat_model(out), load_chat_model(root / "models" / name)
        im = [api.read_image(images[0])]
        assert a.answer(api.featurize(a, im), ["hi"]) == b.answer(api.featurize(b, im), ["hi"])


def test_refusals_are_one_line_and_write_nothing(built, tmp_path, capsys):
    root, _ = built
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep")
    cases = [([str(root / "base"), str(tmp_path / "o1")], f"{root / 'base'}: not a model folder (no model.json)"),
             ([str(root / "image0.png"), str(tmp_path / "o2")], "not a folder"),
             ([str(root / "models/captioner"), str(full)], f"{full}: exists and is not empty"),
             ([str(root / "models/captioner"), str(root / "models/captioner/x")], "inside the model folder")]
    for args, says in cases:
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and says in err[-1] and "Traceback" not in "\n".join(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    assert [p.name for p in full.iterdir()] == ["mine.txt"] and not (root / "models/captioner/x").exists()


def test_a_failed_export_leaves_nothing(built, tmp_path, monkeypatch):
    root, _ = built

    def boom(*a, **k):
        raise UserError("card failed")
    monkeypatch.setattr(export, "model_card", boom)
    with pytest.raises(UserError):
        export.export(root / "models/phi2_lora", tmp_path / "a" / "b" / "qa", "cpu")
    assert list(tmp_path.iterdir()) == []


def test_model_card_reads_the_repository_the_model_came_from(built, tmp_path, monkeypatch):
    root, _ = built
    repo = tmp_path / "repo"
    for name in ("captioner", "siglip"):
        shutil.copytree(root / "models" / name, repo / "models" / name)
    (repo / "dvc.yaml").write_text("stages: {}\n")
    lock = {"schema": "2.0", "stages": {
        "download_coco": {"cmd": "x", "params": {"params.yaml": {"coco": {"source": "synthetic"}}},
                          "outs": [{"path": "data/coco", "md5": "abc.dir", "size": 12}]},
        "train_gpt2_captioner": {"cmd": "x", "params": {"params.yaml": {"captioner": {"beam_size": 3}}},
                                 "deps": [{"path": "data/coco", "md5": "abc.dir", "size": 12}],
                                 "outs": [{"path": "models/captioner", "md5": "def.dir"}]},
        "evaluate_captioner": {"cmd": "x", "deps": [{"path": "models/captioner", "md5": "def.dir"}],
                               "outs": [{"path": "reports/eval/captioner.json", "md5": "0"}]}}}
    (repo / "dvc.lock").write_text(json.dumps(lock))
    (repo / "reports/eval").mkdir(parents=True)
    (repo / "reports/eval/captioner.json").write_text(json.dumps({"metrics": {"cider": 1.25, "baseline_cider": 0.5,
                                                                               "by_type": {"a": 1}}}))
    monkeypatch.setenv("DVC_EXP_NAME", "exp-card")
    export.export(repo / "models/captioner", tmp_path / "out", "cpu")
    card = (tmp_path / "out/README.md").read_text()
    assert "- `data/coco`: md5 `abc.dir`, 12 bytes, written by `download_coco`" in card
    assert "- `download_coco`: coco.source=synthetic" in card
    assert "Stage `train_gpt2_captioner`" in card and "beam_size: 3" in card
    assert "| cider | 1.25 | 0.5 |" in card and "by_type" not in card
    assert "DVC experiment: `exp-card`" in card
