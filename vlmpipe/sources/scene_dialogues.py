"""Conversations about the shapes-world COCO scenes, true to each scene's facts (the offline default).

The synthetic ``data/coco`` stores captions only, but each image was drawn from its own generator
(``numpy.random.default_rng([seed, image_id])``, see ``vlmpipe.data.coco``), so its scene — the
kind, colour, size and quadrant of every shape, the background — is regenerated exactly here.
The regenerated captions must equal the stored ones: a ``data/coco`` made with another seed or
image size is refused, never described wrongly.

Each conversation has 2–4 turns (a second conversation of the same image, ``per_image`` > 1,
differs). Answers are short and checkable, in the captions' words:

- ``first``: a question that stands alone — how many shapes, is there a <kind>, what colour /
  size / where is the <kind>, what is in the <quadrant>, where is <kind> relative to <kind>,
  is the background light or dark;
- ``followup``: a question that cannot be answered without an earlier turn — "what colour is
  it?", "is it small or large?", "where is it?" about the shape the conversation is on, or
  "and the <kind>?" / "and in the <quadrant>?" repeating the last question about something
  else. Only scenes with two or more shapes get them: in a one-shape scene "it" needs no history;
- ``describe``: "describe the image" and the like, answered with one canonical description
  (every shape with its size, colour, kind and quadrant, then the background).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from vlmpipe.core.errors import UserError
from vlmpipe.data.coco import SPLITS, CocoCaptions
from vlmpipe.data.llava import record
from vlmpipe.sources import shapes

log = logging.getLogger(__name__)

GENERATOR = "vlmpipe shapes-world dialogues v1"
NUMBERS = ("no", "one", "two", "three", "four")

_COUNT = ("How many shapes are there?", "How many shapes can you see?")
_DESCRIBE = ("Describe the image.", "What do you see in this picture?", "Describe what is in the image.")


def describe(scene: shapes.Scene) -> str:
    """The canonical description: "a small red star in the top left and a large blue ring in the
    bottom right on a dark background"."""
    parts = [f"{shapes.with_article(s.description)} in the {shapes.QUADRANT_NAMES[s.quadrant]}" for s in scene.shapes]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed} on a {scene.background} background"


class _Dialogue:
    """Draws turns about one scene; remembers what the conversation is about for follow-ups."""

    def __init__(self, scene: shapes.Scene, rng: np.random.Generator) -> None:
        self.scene, self.rng = scene, rng
        self.by_kind = {s.kind: s for s in scene.shapes}
        self.by_quadrant = {s.quadrant: s for s in scene.shapes}
        self.topic: shapes.Shape | None = None   # the shape "it" refers to
        self.last: tuple[str, str] | None = None  # (attribute, how the topic was named) of the last question

    def _pick(self, items):
        return items[int(self.rng.integers(len(items)))]

    def first(self) -> tuple[str, str]:
        sc, shape = self.scene, self._pick(self.scene.shapes)
        kinds = [k for k in shapes.SHAPES if k not in self.by_kind]
        options = ["count", "exists", "colour", "size", "where", "what_at", "what_at", "background"]
        if len(sc.shapes) > 1:
            options += ["relation"]
        kind = self._pick(options)
        self.topic, self.last = None, None  # a new question: "it" means only what this one names
        if kind == "count":
            return self._pick(_COUNT), NUMBERS[len(sc.shapes)]
        if kind == "background":
            return "Is the background light or dark?", sc.background
        if kind == "exists":
            if self.rng.random() < 0.5:
                self.topic = shape
                return f"Is there a {shape.kind} in the image?", "yes"
            return f"Is there a {self._pick(kinds)} in the image?", "no"
        if kind == "what_at":
            q = int(self.rng.integers(4))
            s = self.by_quadrant.get(q)
            self.topic, self.last = s, ("what_at", str(q))
            return f"What is in the {shapes.QUADRANT_NAMES[q]}?", shapes.with_article(s.kind) if s else "nothing"
        if kind == "relation":
            a, b = self.rng.choice(len(sc.shapes), size=2, replace=False)
            sa, sb = sc.shapes[int(a)], sc.shapes[int(b)]
            self.topic = sa
            return f"Where is the {sa.kind} relative to the {sb.kind}?", f"{shapes.relation(sa, sb)} the {sb.kind}"
        self.topic, self.last = shape, (kind, shape.kind)
        return self._attribute(kind, shape, f"the {shape.kind}")

    def _attribute(self, attr: str, s: shapes.Shape, name: str) -> tuple[str, str]:
        if attr == "colour":
            return f"What colour is {name}?", s.colour
        if attr == "size":
            return f"Is {name} small or large?", s.size
        return f"Where is {name}?", f"in the {shapes.QUADRANT_NAMES[s.quadrant]}"

    def followup(self) -> tuple[str, str] | None:
        """A question that needs an earlier turn, or None when the conversation offers none."""
        options = []
        if self.topic is not None:
            options += ["colour", "size"] + (["where"] if self.last is None or self.last[0] != "what_at" else [])
        if self.last is not None:
            options += ["and", "and"]
        if not options:
            return None
        kind = self._pick(options)
        if kind != "and":
            self.last = None
            return self._attribute(kind, self.topic, "it")
        attr, named = self.last
        if attr == "what_at":
            q = self._pick([i for i in range(4) if str(i) != named])
            s = self.by_quadrant.get(q)
            self.topic, self.last = s, ("what_at", str(q))
            return f"And in the {shapes.QUADRANT_NAMES[q]}?", shapes.with_article(s.kind) if s else "nothing"
        other = self._pick([s for s in self.scene.shapes if s.kind != named])
        self.topic, self.last = other, (attr, other.kind)
        return f"And the {other.kind}?", self._attribute(attr, other, "")[1]


def dialogue(scene: shapes.Scene, rng: np.random.Generator) -> tuple[list[tuple[str, str]], list[str]]:
    """(turns, their types) of one conversation about ``scene``: 2–4 turns."""
    d = _Dialogue(scene, rng)
    n = int(rng.integers(2, 5))
    describe_at = int(rng.integers(n)) if rng.random() < 0.5 else -1
    turns, types = [], []
    for t in range(n):
        if t == describe_at:
            turns.append((d._pick(_DESCRIBE), describe(scene)))
            types.append("describe")
            d.topic = d.last = None  # after a description "it" has no single referent
            continue
        asked = {q for q, _ in turns}
        for _ in range(8):  # a question asked twice in one conversation teaches nothing: draw again
            follow = d.followup() if t > 0 and len(scene.shapes) > 1 and rng.random() < 0.7 else None
            turn, kind = (follow, "followup") if follow is not None else (d.first(), "first")
            if turn[0] not in asked:
                break
        turns.append(turn)
        types.append(kind)
    return turns, types


def scenes(coco_root: str | Path, split: str, seed: int):
    """(image id, file name, scene) of every image of a synthetic ``data/coco`` split, regenerated and
    checked against the stored captions."""
    coco = CocoCaptions(coco_root, split)
    if not coco.ids:
        return
    size = coco.image(coco.ids[0]).size[0]
    for iid in coco.ids:
        rng = np.random.default_rng([seed, iid])  # as vlmpipe.data.coco drew the image
        scene = shapes.random_scene(rng, size)
        if shapes.scene_captions(scene, rng, 5) != coco.captions(iid):
            raise UserError(f"{coco_root}: image {iid} is not the shapes-world scene of seed {seed} (its captions "
                            "differ): data/coco was made with another seed or is not synthetic; run "
                            "`dvc repro download_coco`, or use conversations.source: llava_instruct_150k")
        yield iid, Path(coco.member(iid)).name, scene


def build(coco_root: str | Path, seed: int, per_image: int = 1) -> tuple[list[dict], dict[str, list[str]]]:
    """LLaVA-format records about every image of a synthetic ``data/coco``, and each one's turn types:
    ``per_image`` conversations about each training image, one about each held-out (val) image. The
    held-out set does not depend on ``per_image``, so runs with more training conversations are scored
    on the same turns; the first conversation of an image is the same whatever ``per_image``."""
    records, types, n_scenes = [], {}, 0
    for split in SPLITS:
        n = per_image if split == "train" else 1
        for iid, file_name, scene in scenes(coco_root, split, seed):
            n_scenes += 1
            for k in range(n):
                rng = np.random.default_rng([seed, iid, 3, k])
                turns, kinds = dialogue(scene, rng)
                rid = f"{iid:012d}" if n == 1 else f"{iid:012d}-{k}"
                records.append(record(rid, file_name, turns))
                types[rid] = kinds
    log.info("generated %d conversations about %d scenes", len(records), n_scenes)
    return records, types
