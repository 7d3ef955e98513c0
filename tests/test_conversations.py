"""build_conversations: the LLaVA-Instruct format, its validation, and the shapes-world dialogues."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from vlmpipe.data import llava
from vlmpipe.sources import llava as llava_source
from vlmpipe.sources import scene_dialogues
from vlmpipe.sources import shapes
from vlmpipe.data.coco import CocoCaptions
from vlmpipe.core.errors import UserError
from vlmpipe.sources.params import ConversationsParams


def _rec(rid="1", image="000000000001.jpg", turns=(("<image>\nWhat is it?", "a star"),)):
    conv = []
    for q, a in turns:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"id": rid, "image": image, "conversations": conv}


@pytest.mark.parametrize("bad, message", [
    (lambda r: r["conversations"][0].update(value="What is it?"), "record 1 (id 'b'): the first human turn has no <image>"),
    (lambda r: r["conversations"][1].update({"from": "human"}), "record 1 (id 'b'): turn 1 is from 'human', expected 'gpt'"),
    (lambda r: r["conversations"][1].update(value="  "), "record 1 (id 'b'): turn 1 has an empty value"),
    (lambda r: r["conversations"].pop(), "record 1 (id 'b'): conversations must be a list of at least one human"),
    (lambda r: r.update(image=["a.jpg", "b.jpg"]), "record 1 (id 'b'): image must be a file name"),
    (lambda r: r.update(id=["b"]), "record 1: id must be a string or a number"),
    (lambda r: r.pop("id"), "record 1: missing key 'id'"),
    (lambda r: r.pop("conversations"), "record 1 (id 'b'): not a LLaVA conversation (keys 'id', 'image'; "
                                       'expected LLaVA records {"id", "image" (optional), "conversations"'),
])
def test_validation_names_the_record_and_the_problem(tmp_path, bad, message):
    good, broken = _rec("a"), _rec("b")
    bad(broken)
    f = tmp_path / "conv.json"
    f.write_text(json.dumps([good, broken]))
    with pytest.raises(UserError) as e:
        llava.read(f)
    assert str(e.value).startswith(f"{f}: {message}"), str(e.value)
    assert "\n" not in str(e.value)


def test_not_json_and_not_a_list_are_one_line_errors(tmp_path):
    f = tmp_path / "conv.json"
    f.write_text('[{"id": "1", ')
    with pytest.raises(UserError, match=r"conv.json: not JSON"):
        llava.read(f)
    f.write_text('{"id": "1"}')
    with pytest.raises(UserError, match=r"conv.json: not a LLaVA-format file \(keys 'id'; expected LLaVA records"):
        llava.read(f)


def test_image_marker_and_turns_of_a_record():
    r = _rec(turns=(("What is it?\n<image>", "a star"), ("And its colour?", "red")))
    assert llava.turns_of(r) == [("What is it?", "a star"), ("And its colour?", "red")]
    assert llava.image_id("train2017/000000033471.jpg") == 33471 and llava.image_id("cat.jpg") is None
    for name in ("000000033471.jpg", "train2017/000000033471.jpg", "coco/train2017/000000033471.jpg",
                 "COCO_train2014_000000033471.jpg", "coco/val2017/000000033471.jpg"):
        assert llava.image_source(name) == "coco" and llava.image_id(name) == 33471, name
    # Other datasets name images by numbers too: never taken for COCO ids.
    for name, source in (("gqa/images/2354786.jpg", "gqa"), ("vg/VG_100K/2345.jpg", "vg"),
                         ("ocr_vqa/images/689852649.jpg", "ocr_vqa"), ("textvqa/train_images/0054c91397f2fe05.jpg",
                                                                       "textvqa")):
        assert llava.image_source(name) == source and llava.image_id(name) is None, name
    made = llava.record("7", "000000000007.jpg", [("q1", "a1"), ("q2", "a2")])
    assert made["conversations"][0]["value"] == "<image>\nq1" and llava.validate([made], "x")


# ------------------------------------------------------------------ the shapes-world dialogues


def _facts(scene: shapes.Scene) -> dict:
    return {s.kind: s for s in scene.shapes}


def test_synthetic_answers_are_true_to_the_scene(tiny_coco):
    records, types = scene_dialogues.build(tiny_coco, seed=0)
    scenes = {iid: sc for split in ("train", "val") for iid, _, sc in scene_dialogues.scenes(tiny_coco, split, 0)}
    assert len(records) == len(scenes) == 18
    checked = 0
    for r in records:
        sc = scenes[llava.image_id(r["image"])]
        kinds = _facts(sc)
        turns, kinds_of_turns = llava.turns_of(r), types[r["id"]]
        assert 2 <= len(turns) <= 4 and len(kinds_of_turns) == len(turns)
        assert r["conversations"][0]["value"].startswith("<image>\n")
        for (q, a), t in zip(turns, kinds_of_turns):
            if t == "describe":
                assert a == scene_dialogues.describe(sc)
                for s in sc.shapes:
                    assert f"{s.size} {s.colour} {s.kind} in the {shapes.QUADRANT_NAMES[s.quadrant]}" in a
            elif q.startswith("How many shapes"):
                assert a == scene_dialogues.NUMBERS[len(sc.shapes)]
            elif q.startswith("What colour is the "):
                assert a == kinds[q[len("What colour is the "):-1]].colour
            elif q.startswith("Is there a "):
                assert a == ("yes" if q[len("Is there a "):-len(" in the image?")] in kinds else "no")
            elif q.startswith("What is in the "):
                quad = shapes.QUADRANT_NAMES.index(q[len("What is in the "):-1])
                here = [s for s in sc.shapes if s.quadrant == quad]
                assert a == (f"a {here[0].kind}" if here and here[0].kind[0] not in "aeiou" else
                             f"an {here[0].kind}" if here else "nothing")
            elif q == "Is the background light or dark?":
                assert a == sc.background
            else:
                continue
            checked += 1
            if t == "followup":
                assert len(sc.shapes) > 1  # in a one-shape scene "it" would need no history
    assert checked > 20


def test_followups_need_the_earlier_turn():
    """A follow-up refers back: "it" is the shape the conversation is on, "and ...?" repeats the last question."""
    rng = np.random.default_rng(0)
    seen = 0
    for k in range(300):
        scene = shapes.random_scene(rng, 64)
        turns, types = scene_dialogues.dialogue(scene, np.random.default_rng([k]))
        for j, ((q, a), t) in enumerate(zip(turns, types)):
            if t != "followup":
                continue
            seen += 1
            assert j > 0 and types[j - 1] != "describe"
            assert q.startswith(("What colour is it", "Is it small", "Where is it", "And the ", "And in the ")), q
            if q.startswith("And the "):
                other = _facts(scene)[q[len("And the "):-1]]
                assert a in (other.colour, other.size, f"in the {shapes.QUADRANT_NAMES[other.quadrant]}")
        assert len({q for q, _ in turns}) == len(turns) or len(turns) > 3  # no question twice (8 draws)
    assert seen > 100


def test_synthetic_build_is_deterministic_and_holds_out_val_images(tiny_coco, tmp_path):
    p = ConversationsParams(per_image=1)
    a = llava_source.build(p, 0, tiny_coco, tmp_path / "a")
    llava_source.build(p, 0, tiny_coco, tmp_path / "b")
    for name in llava_source.FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    val_ids, train_ids = set(CocoCaptions(tiny_coco, "val").ids), set(CocoCaptions(tiny_coco, "train").ids)
    val, _ = llava.load_split(tmp_path / "a", "val")
    train, types = llava.load_split(tmp_path / "a", "train")
    assert {llava.image_id(r["image"]) for r in val} == val_ids
    assert {llava.image_id(r["image"]) for r in train} == train_ids
    assert a["train"] == 12 and a["val"] == 6 and set(types) == {r["id"] for r in train + val}
    two = llava_source.build(replace(p, per_image=2), 0, tiny_coco, tmp_path / "c")
    assert two["train"] == 24 and two["val"] == 6
    # per_image adds training conversations only: the held-out turns are the very same
    assert llava.load_split(tmp_path / "c", "val")[0] == val


def test_synthetic_refuses_a_coco_of_another_seed(tiny_coco, tmp_path):
    with pytest.raises(UserError, match=r"image \d+ is not the shapes-world scene of seed 3"):
        llava_source.build(ConversationsParams(), 3, tiny_coco, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ a LLaVA-format file


def _llava_file(tmp_path, coco_root, extra=()):
    train = CocoCaptions(coco_root, "train").ids
    recs = [_rec(f"{i:012d}", f"{i:012d}.jpg", (("<image>\nWhat is in the picture?", "shapes on a background"),
                                                  ("Is there a cat?", "No, there is no cat.")))
            for i in train]
    f = tmp_path / "inputs" / "data" / "mine.json"
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps(recs + list(extra)))
    return f


def test_llava_file_is_joined_with_coco_and_absent_images_are_counted(tiny_coco, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    _llava_file(tmp_path, tiny_coco, [_rec("x", "000000999999.jpg"), _rec("y", "cat.jpg")])
    p = ConversationsParams(path="inputs/data/mine.json", heldout_fraction=0.2)
    s = llava_source.build(p, 0, tiny_coco, tmp_path / "out")
    assert s["dropped"] == {f"image not in {tiny_coco}": 1, "image is not a COCO file name": 1}
    assert "the first: id 'x', image '000000999999.jpg'" in caplog.text
    # All 12 are train2017 images: a seeded fifth of them is held out, every conversation of each.
    assert s["val"] == round(0.2 * 12) and s["train"] + s["val"] == 12 and s["train_turns"] == 2 * s["train"]
    val, types = llava.load_split(tmp_path / "out", "val")
    train, _ = llava.load_split(tmp_path / "out", "train")
    assert not {r["image"] for r in val} & {r["image"] for r in train} and types == {}
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["sha256"]


def test_llava_download_comes_from_the_url_param(tiny_coco, tmp_path, file_server):
    f = _llava_file(tmp_path, tiny_coco)
    file_server.files["/mirror/llava_instruct_150k.json"] = f.read_bytes()
    p = ConversationsParams(source="llava_instruct_150k", url=file_server.url("/mirror/llava_instruct_150k.json"))
    s = llava_source.build(p, 0, tiny_coco, tmp_path / "out", download_dir=tmp_path / "dl")
    assert s["train"] + s["val"] == 12 and s["file"] == "llava_instruct_150k.json"
    assert (tmp_path / "dl" / "llava-instruct-150k" / "main" / "llava_instruct_150k.json").is_file()
    # Cached: a second build does not ask the server again.
    n = len(file_server.log)
    llava_source.build(p, 0, tiny_coco, tmp_path / "out2", download_dir=tmp_path / "dl")
    assert len(file_server.log) == n


def test_a_coco_without_the_conversations_images_is_one_line(tiny_coco, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "inputs" / "data" / "other.json"
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps([_rec("1", "000000999999.jpg")]))
    with pytest.raises(UserError, match=r"conversations: 0 training and 0 held-out conversations"):
        llava_source.build(ConversationsParams(path="inputs/data/other.json"), 0, tiny_coco, tmp_path / "out")


def test_params_refuse_synthetic_conversations_about_real_coco():
    from vlmpipe.core.params import from_dict
    from vlmpipe.ops.preflight import ALL_SECTIONS

    with pytest.raises(UserError, match=r"^conversations.source: synthetic conversations .* need coco.source"):
        from_dict({"coco": {"source": "coco2017"}}, ALL_SECTIONS)
    assert from_dict({"coco": {"source": "coco2017"}, "conversations": {"source": "llava_instruct_150k"}}, ALL_SECTIONS)
    with pytest.raises(UserError, match=r"^conversations.path: .* is outside inputs/data/"):
        from_dict({"conversations": {"path": "/tmp/x.json"}}, ALL_SECTIONS)


# ------------------------------------------------------------------ LLaVA data as published

TEXT_ONLY = [  # ShareGPT-style records of LLaVA-1.5's mix: no image, or "image": null
    {"id": "i6IyJda_0", "conversations": [{"from": "human", "value": "Write a haiku about rain."},
                                          {"from": "gpt", "value": "Soft rain on the roof"}]},
    {"id": "wgByO4Y_0", "model": "", "image": None,
     "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                       {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]},
]


def _published_mix(coco_root) -> tuple[list[dict], dict]:
    """Records in the shapes of llava_v1_5_mix665k.json about ``coco_root``'s train images, and what
    each kind is: COCO images named three ways, other datasets' images, text-only records; ids repeat
    (LLaVA names a record by its image)."""
    ids = CocoCaptions(coco_root, "train").ids
    names = [f"coco/train2017/{ids[0]:012d}.jpg", f"train2017/{ids[1]:012d}.jpg", f"{ids[2]:012d}.jpg",
             f"coco/train2017/{ids[3]:012d}.jpg", f"{ids[4]:012d}.jpg"]
    coco = [_rec(f"{ids[k]:012d}", n) for k, n in enumerate(names)]
    coco.append(_rec(f"{ids[0]:012d}", names[0], (("What is it?\n<image>", "shapes"),)))  # the same id again
    other = [_rec("2354786", "gqa/images/2354786.jpg"), _rec("2345", "vg/VG_100K/2345.jpg"),
             _rec("2354787", "gqa/images/2354787.jpg")]
    records = [coco[0], TEXT_ONLY[0], other[0], coco[1], other[1], coco[2], TEXT_ONLY[1], coco[3], other[2],
               coco[4], coco[5]]
    return records, {"coco": coco, "other": other, "text": TEXT_ONLY}


def _write_json_lines(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_published_shapes_are_read_as_a_list_and_as_json_lines(tiny_coco, tmp_path):
    records, kinds = _published_mix(tiny_coco)
    as_list, as_lines = tmp_path / "mix.json", tmp_path / "mix_lines.json"  # told apart by content, not name
    as_list.write_text(json.dumps(records, indent=1))
    _write_json_lines(as_lines, records)
    assert llava.read(as_list) == records == llava.read(as_lines)
    assert [r["id"] for r in llava.read(as_lines) if not llava.has_image(r)] == ["i6IyJda_0", "wgByO4Y_0"]
    one = tmp_path / "one.jsonl"
    _write_json_lines(one, records[:1])  # JSON Lines of one record is one JSON object
    assert llava.read(one) == records[:1]
    # A text-only record is validated like any other, unless the caller drops them unread.
    broken = [records[0], {"id": "t", "conversations": [{"from": "gpt", "value": ""}]}]
    _write_json_lines(tmp_path / "broken.jsonl", broken)
    with pytest.raises(UserError, match=r"broken.jsonl: record 1 \(id 't'\): conversations must be a list"):
        llava.read(tmp_path / "broken.jsonl")
    assert llava.read(tmp_path / "broken.jsonl", check_text_only=False) == broken


@pytest.mark.parametrize("content, message", [
    # JSON Lines with a broken line: the line is named.
    ('{"id": "1", "image": "1.jpg", "conversations": []}\n{"id": "2", oops}\n',
     "bad.json: line 2: not JSON (Expecting property name enclosed in double quotes at column 13); read as JSON Lines"),
    # A JSON list with something after it is not JSON Lines.
    ('[]\n[]\n', "bad.json: not JSON (Extra data: line 2 column 1"),
    # LLaVA's evaluation questions (llava-bench questions.jsonl): another schema.
    ('{"question_id": 0, "image": "001.jpg", "text": "What is unusual?", "category": "complex"}\n'
     '{"question_id": 1, "image": "002.jpg", "text": "Describe it.", "category": "detail"}\n',
     "bad.json: record 0: not a LLaVA conversation (keys 'question_id', 'image', 'text', 'category'; "
     'expected LLaVA records {"id", "image" (optional), "conversations": [{"from": "human", "value"}'),
    # OpenAI-style messages.
    ('[{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]',
     "bad.json: record 0: not a LLaVA conversation (keys 'messages'; expected LLaVA records"),
    # A COCO annotation file.
    ('{"info": {}, "images": [], "annotations": []}',
     "bad.json: not a LLaVA-format file (keys 'info', 'images', 'annotations'; expected LLaVA records"),
    ('[[1, 2]]', "bad.json: record 0: not a LLaVA conversation (a JSON list; expected LLaVA records"),
])
def test_another_schema_is_one_line_naming_the_schema_expected(tmp_path, content, message):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(UserError) as e:
        llava.read(f)
    assert str(e.value).startswith(f"{tmp_path}/{message}"), str(e.value)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


@pytest.mark.parametrize("lines", [False, True])
def test_the_published_mix_through_build(tiny_coco, tmp_path, monkeypatch, caplog, lines):
    """text_only: skip (the default): COCO records kept whichever way their image is named, and joined to
    the COCO images; other datasets' and text-only records dropped and counted, one warning line each."""
    monkeypatch.chdir(tmp_path)
    records, kinds = _published_mix(tiny_coco)
    f = tmp_path / "inputs" / "data" / "mix.json"
    f.parent.mkdir(parents=True)
    _write_json_lines(f, records) if lines else f.write_text(json.dumps(records))
    with caplog.at_level("WARNING"):
        s = llava_source.build(ConversationsParams(path="inputs/data/mix.json", heldout_fraction=0.3), 0,
                               tiny_coco, tmp_path / "out")
    assert s["dropped"] == {"image from 'gqa', not COCO": 2, "image from 'vg', not COCO": 1,
                            "no image (text-only; conversations.text_only: skip)": 2}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 3 and all("\n" not in w for w in warnings), warnings
    assert "dropped 2 conversations: image from 'gqa', not COCO (the first: id '2354786', image " \
           "'gqa/images/2354786.jpg')" in warnings
    assert any(w.startswith("dropped 1 conversations: image from 'vg'") for w in warnings)
    assert "text_only" not in s
    train, _ = llava.load_split(tmp_path / "out", "train")
    val, _ = llava.load_split(tmp_path / "out", "val")
    kept = train + val
    assert sorted(map(json.dumps, kept)) == sorted(map(json.dumps, kinds["coco"]))
    assert s["train"] + s["val"] == len(kinds["coco"]) == 6 and s["val"] > 0
    coco = CocoCaptions(tiny_coco, "train")
    for r in kept:  # each image resolves to its COCO file, by file name
        iid = llava.image_id(r["image"])
        assert Path(coco.member(iid)).name == Path(r["image"]).name
        assert coco.image(iid).size == (64, 64)


def test_text_only_conversations_can_be_trained(tiny_coco, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    records, kinds = _published_mix(tiny_coco)
    f = tmp_path / "inputs" / "data" / "mix.jsonl"
    f.parent.mkdir(parents=True)
    _write_json_lines(f, records)
    p = ConversationsParams(path="inputs/data/mix.jsonl", heldout_fraction=0.3, text_only="train")
    s = llava_source.build(p, 0, tiny_coco, tmp_path / "out")
    assert s["dropped"] == {"image from 'gqa', not COCO": 2, "image from 'vg', not COCO": 1}
    assert s["text_only"] == 2 and s["train"] + s["val"] == 6 + 2
    train, _ = llava.load_split(tmp_path / "out", "train")
    val, _ = llava.load_split(tmp_path / "out", "val")
    assert [r for r in train if not llava.has_image(r)] == TEXT_ONLY and all(map(llava.has_image, val))
    assert s["train_turns"] == sum(len(r["conversations"]) // 2 for r in train)
    # A text-only record that breaks the format is refused when it would be trained.
    bad = dict(TEXT_ONLY[0], conversations=[{"from": "human", "value": "Hi"}])
    _write_json_lines(f, records + [bad])
    with pytest.raises(UserError, match=r"mix.jsonl: record 11 \(id 'i6IyJda_0'\): conversations must be a list"):
        llava_source.build(p, 0, tiny_coco, tmp_path / "out2")
    assert llava_source.build(replace(p, text_only="skip"), 0, tiny_coco, tmp_path / "out3")["dropped"][
        "no image (text-only; conversations.text_only: skip)"] == 3


def test_text_only_param_is_validated():
    from vlmpipe.core.params import from_dict
    from vlmpipe.ops.preflight import ALL_SECTIONS

    with pytest.raises(UserError) as e:
        from_dict({"conversations": {"text_only": "keep"}}, ALL_SECTIONS)
    assert str(e.value).startswith("conversations.text_only: must be 'skip' or 'train', got 'keep'")
    assert from_dict({"conversations": {"text_only": "train"}}, ALL_SECTIONS).conversations.text_only == "train"
