"""The scene score (vlmpipe/scoring/scene.py): a caption of a shapes-world scene is right exactly when
everything it says about the scene is true and it names every shape; scenes drawn here with the
generator itself, their facts as download_coco writes them."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from vlmpipe.core.errors import UserError
from vlmpipe.data.coco import scenes_member
from vlmpipe.scoring import scene as S
from vlmpipe.sources import coco as coco_source, scene_dialogues, shapes

WORLD = S.World(coco_source.scene_vocabulary())


def _scenes(n: int, shapes_in: int | None = None, seed: int = 7):
    """``n`` random scenes (of ``shapes_in`` shapes when given) with their generators."""
    out, k = [], 0
    while len(out) < n:
        rng = np.random.default_rng([seed, k])
        sc = shapes.random_scene(rng, 32)
        k += 1
        if shapes_in is None or len(sc.shapes) == shapes_in:
            out.append((sc, rng))
    return out


def _judge(caption: str, scene: shapes.Scene) -> S.Verdict:
    return WORLD.judge(caption, coco_source.scene_facts(scene))


def test_every_template_and_the_canonical_description_is_right_about_its_own_scene():
    n_shapes = set()
    for sc, rng in _scenes(300):
        n_shapes.add(len(sc.shapes))
        for caption in shapes.scene_captions(sc, rng, 7) + [scene_dialogues.describe(sc)]:  # 7: every template
            v = _judge(caption, sc)
            assert v.right and v.shapes_right == v.n_shapes == len(sc.shapes), (caption, v.problems)
    assert n_shapes == {1, 2, 3}


def test_a_caption_of_another_scene_is_wrong():
    (a, _), (b, _) = _scenes(2, shapes_in=2)
    assert not _judge(scene_dialogues.describe(a), b).right


def _three():
    sc, _ = _scenes(1, shapes_in=3)[0]
    return sc


def _other(values, not_this):
    return next(v for v in values if v != not_this)


def test_one_wrong_fact_makes_the_caption_wrong():
    sc = _three()
    a, b, c = sc.shapes
    desc = scene_dialogues.describe(sc)
    assert _judge(desc, sc).right
    other_colour = _other(shapes.COLOURS, a.colour)
    free = next(q for q in range(4) if q not in {s.quadrant for s in sc.shapes})
    spare = _other([k for k in shapes.SHAPES if k not in {s.kind for s in sc.shapes}], None)
    A, B, C = (shapes.with_article(s.description) for s in sc.shapes)

    def swapped(**changes):  # the canonical description of the scene with a shape changed
        return scene_dialogues.describe(dataclasses.replace(sc, shapes=tuple(changes.get(f"s{i}", s)
                                                                             for i, s in enumerate(sc.shapes))))

    wrong = {
        "a swapped colour": swapped(s0=dataclasses.replace(a, colour=other_colour)),
        "another size": swapped(s1=dataclasses.replace(b, size=_other(shapes.SIZES, b.size))),
        "another kind": swapped(s2=dataclasses.replace(c, kind=spare)),
        "two quadrants swapped": swapped(s0=dataclasses.replace(a, quadrant=b.quadrant),
                                         s1=dataclasses.replace(b, quadrant=a.quadrant)),
        "a quadrant moved": swapped(s2=dataclasses.replace(c, quadrant=free)),
        "the relation reversed": f"{A} {shapes.relation(b, a)} {B}, and {C} in the {shapes.QUADRANT_NAMES[c.quadrant]}",
        "a shape missing": scene_dialogues.describe(dataclasses.replace(sc, shapes=sc.shapes[:2])),
        "an extra shape": f"{desc[:desc.index(' on a ')]} and a small red {spare} in the "
                          f"{shapes.QUADRANT_NAMES[free]} on a {sc.background} background",
        "a shape named twice": f"{A}, {B}, {C} and {A}",
        "the count": f"two shapes: {A}, {B} and {C}",
        "the background": f"{A}, {B} and {C} on a {_other(shapes.BACKGROUNDS, sc.background)} background",
        "broken off": f"{A}, {B} and {C} in the",
    }
    for what, caption in wrong.items():
        v = _judge(caption, sc)
        assert not v.right and v.problems, (what, caption)
    # The per-shape figure counts the shapes named right, whatever else is wrong.
    assert _judge(wrong["a swapped colour"], sc).shapes_right == 2
    assert _judge(wrong["a shape missing"], sc).shapes_right == 2
    assert _judge(wrong["two quadrants swapped"], sc).shapes_right == 3
    assert _judge(wrong["a shape named twice"], sc).shapes_right == 2


def test_relations_are_checked_direction_by_direction():
    sc = next(sc for sc, _ in _scenes(50, shapes_in=2)
              if {s.quadrant for s in sc.shapes} in ({0, 3}, {1, 2}))  # on a diagonal: both directions differ
    a, b = sc.shapes
    A, B = (shapes.with_article(s.description) for s in sc.shapes)
    full = shapes.relation(a, b)  # e.g. "above and to the left of"
    vertical, horizontal = full.split(" and ")
    for said in (full, vertical, horizontal):  # each direction stated is true
        assert _judge(f"{A} {said} {B}", sc).right, said
    flip = {"above": "below", "below": "above", "to the left of": "to the right of", "to the right of": "to the left of"}
    for said in (f"{flip[vertical]} and {horizontal}", f"{vertical} and {flip[horizontal]}", flip[vertical],
                 flip[horizontal]):
        assert not _judge(f"{A} {said} {B}", sc).right, said


@pytest.mark.parametrize("caption", [
    "", "   ", "!!!", "the the the", "zzz qqq", "a small", "a small red", "a small red star in the",
    "a small red star on a", "a small red star coloured", "a small red star and", "a small red star above",
    "in the top left", "a red star", "a small star", "star", "a small red star near the top",
    "a small red star in the top left in the top left of of", "small small red star", "a small red blue star",
    "two", "shapes shapes", "a small red star " * 40, "a\x00small\ufffdred star", "on a dark background",
    "a small red star, a small red star",
])
def test_malformed_text_is_wrong_without_an_exception(caption):
    scene = {"background": "dark", "shapes": [{"kind": "star", "colour": "red", "size": "small", "quadrant": "top left"}]}
    assert WORLD.judge("a small red star in the top left on a dark background", scene).right
    v = WORLD.judge(caption, scene)
    assert not v.right and v.problems and v.n_shapes == 1


def _facts_file(tmp_path, scenes, override=None):
    data = {"vocabulary": coco_source.scene_vocabulary(), "scenes": scenes, **(override or {})}
    path = tmp_path / scenes_member("val")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_scores_are_shares_of_scenes_and_of_shapes(tmp_path):
    (one, _), = _scenes(1, shapes_in=1)
    (three, _), = _scenes(1, shapes_in=3)
    _facts_file(tmp_path, [{"image_id": 5, **coco_source.scene_facts(one)}, {"image_id": 9, **coco_source.scene_facts(three)}])
    facts = S.load_scene_facts(tmp_path, "val")
    a, b, c = three.shapes
    half = f"{shapes.with_article(a.description)} and {shapes.with_article(b.description)}"  # leaves c out
    got = facts.score({5: scene_dialogues.describe(one), 9: half})
    assert got == {"scene_right": 0.5, "scene_shapes_right": 3 / 4}
    assert facts.score({5: "nonsense", 9: scene_dialogues.describe(three)}) == {"scene_right": 0.5,
                                                                                "scene_shapes_right": 3 / 4}
    with pytest.raises(UserError, match=r"scenes_val2017\.json: no facts for image 6"):
        facts.score({6: "a small red star"})
    assert S.load_scene_facts(tmp_path, "train") is None  # no file: real COCO


@pytest.mark.parametrize("override, words", [
    ({"vocabulary": {"kinds": ["star"]}}, "'vocabulary' needs non-empty word lists"),
    ({"scenes": {"5": {}}}, "needs a 'scenes' list"),
    ({"scenes": [{"image_id": 5, "background": "grey", "shapes": []}]}, "scenes[0] needs"),
    ({"scenes": [{"image_id": 5, "background": "dark",
                  "shapes": [{"kind": "star", "colour": "red", "size": "small", "quadrant": "middle"}]}]}, "scenes[0] needs"),
])
def test_a_broken_facts_file_is_one_line_naming_it(tmp_path, override, words):
    path = _facts_file(tmp_path, [], override)
    with pytest.raises(UserError) as e:
        S.load_scene_facts(tmp_path, "val")
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and words in msg and "\n" not in msg
    path.write_text("{not json")
    with pytest.raises(UserError, match="not a readable scene facts file"):
        S.load_scene_facts(tmp_path, "val")
