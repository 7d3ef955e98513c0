"""``python -m vlmpipe predict`` (vlmpipe/face/predict.py): batch inference over a folder, a CSV or a JSON
Lines file, on tiny untrained models (the point is that a batched record equals what the one-image
API answers, in input order, with bad rows reported and never stopping the run)."""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest

import untrained
from vlmpipe.__main__ import main
from vlmpipe.core.errors import UserError
from vlmpipe.face import api
from vlmpipe.face import predict


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """models/{siglip,captioner,chat,phi2_vlm} and a folder of images: the two PNGs, a third, and a broken one."""
    root, images = untrained.build(tmp_path_factory.mktemp("predict"))
    photos = root / "photos"
    photos.mkdir()
    for i, p in enumerate(images):
        shutil.copy(p, photos / f"a{i}.png")
    shutil.copy(images[0], photos / "c.PNG")  # suffixes in any case
    (photos / "b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (photos / "notes.txt").write_text("not an image, not read")
    return root, images


@pytest.fixture(scope="module")
def models(built):
    root, _ = built
    return {k: predict.load_model(root / "models" / d, "cpu")
            for k, d in (("captioner", "captioner"), ("qa", "phi2_vlm"), ("chat", "chat"))}


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_folder_captions_equal_the_one_image_api_in_name_order(built, models):
    root, _ = built
    photos = root / "photos"
    rows = predict.read_rows(photos)
    out = list(predict.predict_rows(models["captioner"], rows, batch_size=2))
    assert [r["image"] for r in out] == ["a0.png", "a1.png", "b_broken.png", "c.PNG"]
    assert "caption" not in out[2] and out[2]["error"].startswith(str(photos / "b_broken.png") + ": cannot read image")
    good = [photos / n for n in ("a0.png", "a1.png", "c.PNG")]
    expect = api.caption_images(models["captioner"], [api.read_image(p) for p in good])
    assert [out[i]["caption"] for i in (0, 1, 3)] == expect


def test_jsonl_answers_with_histories_and_row_errors(built, models, tmp_path):
    root, images = built
    data = tmp_path / "in"
    data.mkdir()
    rel = os.path.relpath(images[0], data)  # relative to the input file's folder
    lines = [
        {"image": str(rel), "question": "what colour is it?", "id": 7},
        {"image": str(images[1]), "messages": [{"role": "user", "content": "what is it?"},
                                               {"role": "assistant", "content": "a circle"},
                                               {"role": "user", "content": "is it red?"}]},
        {"image": str(rel)},                                                   # no question
        {"question": "what?"},                                                 # no image
        {"image": "missing.png", "question": "what?"},                         # no such file
        {"image": str(rel), "messages": [{"role": "assistant", "content": "hi"}]},  # wrong turn order
        {"image": str(rel), "question": "   "},                                # empty question
    ]
    text = "\n".join(json.dumps(x) for x in lines[:3]) + "\n{not json\n\n" + "\n".join(json.dumps(x) for x in lines[3:])
    (data / "q.jsonl").write_text(text + "\n")
    for kind in ("qa", "chat"):
        rows = predict.read_rows(data / "q.jsonl")
        out = list(predict.predict_rows(models[kind], rows, batch_size=3))
        assert len(out) == 8
        assert out[0]["id"] == 7 and out[0]["question"] == "what colour is it?" and "messages" in out[1]
        m = models[kind]
        feats0 = api.featurize(m, [api.read_image(images[0])])
        feats1 = api.featurize(m, [api.read_image(images[1])])
        assert out[0]["answer"] == m.answer(feats0, ["what colour is it?"], [[]])[0]
        assert out[1]["answer"] == m.answer(feats1, ["is it red?"], [[("what is it?", "a circle")]])[0]
        errors = [r.get("error", "") for r in out[2:]]
        assert "no question" in errors[0]
        assert "line 4: not valid JSON" in errors[1]
        assert "no image" in errors[2]
        assert errors[3] == f"{data / 'missing.png'}: image file not found"
        assert "role user" in errors[4]
        assert "question is empty" in errors[5]
        assert all("\n" not in e and "Traceback" not in e for e in errors)


def test_csv_with_image_path_column_and_question_default(built, models, tmp_path):
    root, images = built
    path = tmp_path / "rows.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "image_path", "question"])
        w.writerow(["x", str(images[0]), "is it round?"])
        w.writerow(["y", str(images[1]), ""])
        w.writerow(["z", "", "what?"])
    out = list(predict.predict_rows(models["qa"], predict.read_rows(path, question="what shape?"), batch_size=8))
    assert [r["id"] for r in out] == ["x", "y", "z"]
    assert out[1]["question"] == "what shape?"
    m = models["qa"]
    feats = api.featurize(m, [api.read_image(p) for p in images])
    assert [out[0]["answer"], out[1]["answer"]] == m.answer(feats, ["is it round?", "what shape?"], [[], []])
    assert out[2]["error"] == f"{path} line 4: column image_path is empty"


@pytest.mark.parametrize("content, says", [
    ("name,question\na.png,q\n", "line 1 (header): no image column (name one 'image' or 'image_path'"),
    ("image,question\n", "no data rows"),
    ("", "empty file"),
])
def test_command_errors_about_the_csv_are_one_line(tmp_path, content, says):
    path = tmp_path / "in.csv"
    path.write_text(content)
    with pytest.raises(UserError, match=r"^" + str(path).replace(".", r"\.") + ": ") as e:
        predict.read_rows(path)
    assert says in str(e.value)


def test_cli_writes_the_output_file_whole_and_stdout_clean(built, tmp_path, capsys):
    root, _ = built
    out = tmp_path / "out.jsonl"
    rc = main(["predict", "--model", str(root / "models/phi2_vlm"), str(root / "photos"), "--question",
               "what is it?", "-o", str(out), "--device", "cpu", "--batch-size", "2"])
    cap = capsys.readouterr()
    assert rc == 0 and cap.out == ""
    got = records(out.read_text())
    assert [r["image"] for r in got] == ["a0.png", "a1.png", "b_broken.png", "c.PNG"]
    assert sum("error" in r for r in got) == 1 and all("answer" in r for r in got if "error" not in r)
    assert list(tmp_path.iterdir()) == [out]  # no temp file left beside it
    rc = main(["predict", "--model", str(root / "models/captioner"), str(root / "photos"), "--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 0 and [r["image"] for r in records(cap.out)] == ["a0.png", "a1.png", "b_broken.png", "c.PNG"]
    assert "Traceback" not in cap.err


def test_a_failed_run_leaves_no_output_file(built, tmp_path, monkeypatch):
    root, _ = built
    out = tmp_path / "out.jsonl"
    out.write_text("the previous run's\n")

    def boom(*a, **k):
        raise RuntimeError("model failed mid-run")
    monkeypatch.setattr("vlmpipe.models.captioner.Captioner.caption", boom)
    with pytest.raises(RuntimeError):
        predict.run(root / "models/captioner", root / "photos", out, device="cpu", batch_size=1)
    assert out.read_text() == "the previous run's\n" and list(tmp_path.iterdir()) == [out]


@pytest.mark.parametrize("args, says", [
    (["predict", "--model", "{root}/models/captioner", "{root}/nowhere"], "{root}/nowhere: not found"),
    (["predict", "--model", "{root}/photos", "{root}/photos"], "--model: {root}/photos has no model.json"),
    (["predict", "--model", "{root}/nope", "{root}/photos"], "--model: {root}/nope is not a folder"),
    (["predict", "--model", "{root}/models/captioner", "{root}/photos", "--question", "q"], "takes no question"),
    (["predict", "--model", "{root}/models/captioner", "{root}/image0.png"], "one image; predict takes a folder"),
    (["predict", "--model", "{root}/models/captioner", "{root}/photos", "-o", "{root}/no/dir/o.jsonl"],
     "--output: {root}/no/dir does not exist"),
    (["predict", "--model", "{root}/models/captioner", "{root}/photos", "--batch-size", "0"], "--batch-size"),
])
def test_command_errors_are_one_line_and_exit_2(built, capsys, args, says):
    root, _ = built
    rc = main([a.format(root=root) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("error: ") and says.format(root=root) in err[-1], err
    assert not any("Traceback" in line for line in err)
