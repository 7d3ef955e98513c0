"""Whether a caption of a shapes-world scene is entirely right, checked against the scene's facts.

The synthetic ``download_coco`` writes the facts of every scene beside its captions
(``annotations/scenes_{split}2017.json``: each shape's kind, colour, size and quadrant, the
background, and the world's vocabulary); real COCO has no such file and gets no scene score.

A caption is read into what it claims: the shapes it names (size, colour, kind: "a small red star",
"a small star coloured red"; the quadrant where it says "in the top left"), the relations it states
("A above and to the left of B", "to the right of", "below"), the count ("two shapes", "a single")
and the background ("on a dark background"). It is **right** when it names exactly the scene's
shapes, each once with its kind, colour and size, and every position, relation, count and
background it states is true; a caption that states no position is not wrong for that. A relation
is true when each direction it states is: "A above B" says A's row is above B's, nothing about
columns. A word outside the world's language, or a phrase broken off ("in the" and no quadrant),
makes a caption wrong: what the scorer cannot read it cannot call true.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from vlmpipe.core.errors import UserError
from vlmpipe.data.coco import scenes_member
from vlmpipe.scoring.metrics import tokenize_caption

_ARTICLES = {"a", "an", "the"}
_NUMBERS = {w: n for n, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                        "nine", "ten"))}
# Words that join claims and claim nothing themselves.
_FILLERS = (("there", "is"), ("there", "are"), ("picture", "of"), ("and",))
# A relation's directions: (rows, columns) of A minus B's sign; 0 where it says nothing.
_VERTICAL = {("above",): -1, ("below",): 1}
_HORIZONTAL = {("to", "left", "of"): -1, ("to", "right", "of"): 1}
_RELATIONS = {**{v: (dv, 0) for v, dv in _VERTICAL.items()}, **{h: (0, dh) for h, dh in _HORIZONTAL.items()},
              **{v + ("and",) + h: (dv, dh) for v, dv in _VERTICAL.items() for h, dh in _HORIZONTAL.items()}}


@dataclass
class Mention:
    """One shape a caption names: every size and colour word given to it (exactly one each is a name)."""
    kind: str
    sizes: list[str] = field(default_factory=list)
    colours: list[str] = field(default_factory=list)
    quadrants: list[str] = field(default_factory=list)


@dataclass
class Claims:
    shapes: list[Mention] = field(default_factory=list)
    relations: list[tuple[int, int, int, int]] = field(default_factory=list)  # (A, B, rows, columns)
    counts: list[int] = field(default_factory=list)
    backgrounds: list[str] = field(default_factory=list)
    unread: list[str] = field(default_factory=list)  # what the caption says that could not be read


@dataclass
class Verdict:
    right: bool
    shapes_right: int  # the scene's shapes named once, with kind, colour and size right
    n_shapes: int
    problems: list[str]  # why it is wrong, in words


def _phrases(words) -> dict[tuple[str, ...], str]:
    return {tuple(tokenize_caption(w).split()): w for w in words}


def _match(tokens: list[str], i: int, phrases: Mapping[tuple[str, ...], object]):
    """(value, length) of the longest phrase starting at ``tokens[i]``, or (None, 0)."""
    for p in sorted(phrases, key=len, reverse=True):
        if p and tuple(tokens[i:i + len(p)]) == p:
            return phrases[p], len(p)
    return None, 0


class World:
    """The reader and judge of captions in one world's vocabulary (the facts file's ``vocabulary``)."""

    def __init__(self, vocabulary: Mapping) -> None:
        self.kinds = _phrases(vocabulary["kinds"])
        self.sizes = _phrases(vocabulary["sizes"])
        self.colours = _phrases(vocabulary["colours"])
        self.backgrounds = _phrases(vocabulary["backgrounds"])
        self.quadrants = _phrases(q["name"] for q in vocabulary["quadrants"])
        self.grid = {q["name"]: (q["row"], q["column"]) for q in vocabulary["quadrants"]}
        self.adjectives = {**{p: ("size", w) for p, w in self.sizes.items()},
                           **{p: ("colour", w) for p, w in self.colours.items()}}

    def read(self, caption: str) -> Claims:
        """What ``caption`` claims; anything it says that is not a claim of this world goes to ``unread``."""
        t = [w for w in tokenize_caption(caption if isinstance(caption, str) else "").split() if w not in _ARTICLES]
        c = Claims()
        pending = None  # (A, rows, columns) of a relation waiting for its B
        i = 0
        while i < len(t):
            start = i
            quadrant, n = _match(t, i + 1, self.quadrants) if t[i] == "in" else (None, 0)
            if quadrant:  # "in the top left" [of the image]: where the last named shape is
                i += 1 + n
                i += 2 if t[i:i + 2] == ["of", "image"] else 0
                if not c.shapes or pending:
                    c.unread.append(" ".join(t[start:i]))
                else:
                    c.shapes[-1].quadrants.append(quadrant)
                continue
            background, n = _match(t, i + (t[i] == "on"), self.backgrounds)
            if background and t[i + (t[i] == "on") + n:][:1] == ["background"]:
                c.backgrounds.append(background)
                i += (t[i] == "on") + n + 1
                continue
            if t[i] in _NUMBERS and t[i + 1:i + 2] in (["shape"], ["shapes"]):
                c.counts.append(_NUMBERS[t[i]])
                i += 2
                continue
            if t[i] == "single":
                c.counts.append(1)
                i += 1
                continue
            rel, n = _match(t, i, _RELATIONS)
            if rel:
                if not c.shapes or pending:
                    c.unread.append(" ".join(t[i:i + n]))
                else:
                    pending = (len(c.shapes) - 1, *rel)
                i += n
                continue
            mention, i = self._mention(t, i)
            if mention:
                if pending:
                    c.relations.append((pending[0], len(c.shapes), pending[1], pending[2]))
                    pending = None
                c.shapes.append(mention)
                continue
            if i > start:  # size or colour words with no shape after them
                c.unread.append(" ".join(t[start:i]))
                continue
            _, n = _match(t, i, {f: f for f in _FILLERS})
            if not n:
                c.unread.append(t[i])
            elif i + n == len(t):  # "… and", "there is": broken off
                c.unread.append(" ".join(t[i:]))
            i += max(n, 1)
        if pending:
            c.unread.append("a relation to nothing")
        return c

    def _mention(self, t: list[str], i: int) -> tuple[Mention | None, int]:
        """A shape named at ``t[i]``: size and colour words, its kind, [coloured <colour>]; and where reading
        goes on (past the adjectives read, when no kind follows them)."""
        words = []
        while True:
            adj, n = _match(t, i, self.adjectives)
            if not adj:
                break
            words.append(adj)
            i += n
        kind, n = _match(t, i, self.kinds)
        if not kind:
            return None, i
        i += n
        if t[i:i + 1] == ["coloured"]:
            colour, n = _match(t, i + 1, self.colours)
            if colour:
                words.append(("colour", colour))
                i += 1 + n
        return Mention(kind, [w for a, w in words if a == "size"], [w for a, w in words if a == "colour"]), i

    def judge(self, caption: str, scene: Mapping) -> Verdict:
        """``caption`` against ``scene`` (``{"background", "shapes": [{"kind", "colour", "size", "quadrant"}]}``)."""
        c = self.read(caption)
        truth = {s["kind"]: s for s in scene["shapes"]}
        named = Counter(m.kind for m in c.shapes)
        problems = [f"cannot read {u!r}" for u in c.unread]
        shapes_right = 0
        for m in c.shapes:
            s = truth.get(m.kind)
            if s is None:
                problems.append(f"names a {m.kind}; the scene has none")
                continue
            if named[m.kind] > 1:
                problems.append(f"names the {m.kind} {named[m.kind]} times")
                continue
            ok = True
            for what, said in (("size", m.sizes), ("colour", m.colours)):
                if said != [s[what]]:
                    problems.append(f"the {m.kind} is {s[what]}, not {' '.join(said)}" if said else
                                    f"the {m.kind}'s {what} is not said")
                    ok = False
            shapes_right += ok
            problems += [f"the {m.kind} is in the {s['quadrant']}, not the {q}" for q in m.quadrants if q != s["quadrant"]]
        problems += [f"leaves out the {s['size']} {s['colour']} {k}" for k, s in truth.items() if not named[k]]
        for a, b, rows, cols in c.relations:
            sa, sb = truth.get(c.shapes[a].kind), truth.get(c.shapes[b].kind)
            if sa is None or sb is None or sa is sb:
                continue  # an extra or repeated shape is wrong already
            (ra, ca), (rb, cb) = self.grid[sa["quadrant"]], self.grid[sb["quadrant"]]
            if (rows and (ra - rb) * rows <= 0) or (cols and (ca - cb) * cols <= 0):
                problems.append(f"the {sa['kind']} ({sa['quadrant']}) is not where it is said to be relative to "
                                f"the {sb['kind']} ({sb['quadrant']})")
        problems += [f"{n} shapes said, {len(truth)} in the scene" for n in c.counts if n != len(truth)]
        problems += [f"the background is {scene['background']}, not {b}" for b in c.backgrounds
                     if b != scene["background"]]
        return Verdict(not problems, shapes_right, len(truth), problems)


class SceneFacts:
    """The facts file of one split: the world, and each image id's scene."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise UserError(f"{self.path}: not a readable scene facts file ({type(e).__name__}); "
                            "run `dvc repro download_coco`") from None
        self.world = World(self._vocabulary(data))
        self.scenes = {s["image_id"]: s for s in self._scenes(data)}

    def _fail(self, what: str):
        raise UserError(f"{self.path}: {what}; run `dvc repro download_coco` to write it again")

    def _vocabulary(self, data) -> dict:
        v = data.get("vocabulary") if isinstance(data, dict) else None
        lists = ("kinds", "sizes", "colours", "backgrounds")
        if not isinstance(v, dict) or not all(isinstance(v.get(k), list) and v[k] and
                                              all(isinstance(w, str) and w.strip() for w in v[k]) for k in lists):
            self._fail(f"'vocabulary' needs non-empty word lists {', '.join(lists)}")
        q = v.get("quadrants")
        if not isinstance(q, list) or not q or not all(
                isinstance(x, dict) and isinstance(x.get("name"), str) and x["name"].strip()
                and type(x.get("row")) is int and type(x.get("column")) is int for x in q):
            self._fail("'vocabulary.quadrants' needs a list of {name, column, row}")
        return v

    def _scenes(self, data) -> list[dict]:
        scenes, v = data.get("scenes"), data["vocabulary"]
        if not isinstance(scenes, list):
            self._fail("needs a 'scenes' list")
        words = {"kind": v["kinds"], "colour": v["colours"], "size": v["sizes"],
                 "quadrant": [q["name"] for q in v["quadrants"]]}
        for i, s in enumerate(scenes):
            ok = (isinstance(s, dict) and type(s.get("image_id")) is int and s.get("background") in v["backgrounds"]
                  and isinstance(s.get("shapes"), list)
                  and all(isinstance(x, dict) and all(x.get(k) in ws for k, ws in words.items()) for x in s["shapes"])
                  and len({x["kind"] for x in s["shapes"]}) == len(s["shapes"]))
            if not ok:
                self._fail(f"scenes[{i}] needs an integer 'image_id', a 'background' and 'shapes' of distinct kinds, "
                           "each with a kind, colour, size and quadrant of the vocabulary")
        return scenes

    def judge(self, caption: str, image_id: int) -> Verdict:
        if image_id not in self.scenes:
            raise UserError(f"{self.path}: no facts for image {image_id}; run `dvc repro download_coco`")
        return self.world.judge(caption, self.scenes[image_id])

    def score(self, captions: Mapping[int, str]) -> dict:
        """``scene_right``: the share of images whose caption is entirely right; ``scene_shapes_right``: the
        share of their shapes named once with the right kind, colour and size."""
        verdicts = [self.judge(c, i) for i, c in captions.items()]
        n = sum(v.n_shapes for v in verdicts)
        return {"scene_right": sum(v.right for v in verdicts) / max(len(verdicts), 1),
                "scene_shapes_right": sum(v.shapes_right for v in verdicts) / max(n, 1)}


def load_scene_facts(coco_root: str | os.PathLike, split: str) -> SceneFacts | None:
    """The scene facts of a synthetic ``data/coco`` split; None for real COCO (no facts file)."""
    path = Path(coco_root) / scenes_member(split)
    return SceneFacts(path) if path.is_file() else None
