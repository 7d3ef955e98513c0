"""The demo's held-out examples, each from its model's own data, and what that data knows about them:
COCO val scenes with their reference captions and held-out conversation (the captioner and the chat
model), and single shapes from the Q/A CSV's test rows with their questions and answers (the QA
model). A reply to a known question is marked by the evaluation's own rule."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from vlmpipe.scoring.metrics import normalize_answer, vqa_accuracy

log = logging.getLogger("vlmpipe.face.serve")

N_EXAMPLES = 12
# Turn types whose answer depends on the turns before them ("what colour is it?"): scene_dialogues'
# follow-ups, and every later turn of a conversation whose source records no types (llava.default_types).
NEEDS_HISTORY = ("followup", "later")


@dataclass
class Example:
    """A held-out image the page offers, and what the held-out data knows about it."""

    key: str                    # its id in the API: a COCO val image id ("4882"), or "cifar-test-17"
    kind: str                   # "scene" (the captioner's and chat model's) or "shape" (the QA model's)
    image: object               # an RGB PIL image
    references: list[str] = field(default_factory=list)             # reference captions (scenes)
    turns: list[tuple[str, str, str]] = field(default_factory=list)  # held-out (question, answer, type)

    def known_answer(self, message: str, history: list[tuple[str, str]]) -> tuple[str, str] | None:
        """(answer, type) of the held-out turn that asks ``message`` after ``history``, or None.
        Questions match after the scorer's normalisation. A question stands alone, except a follow-up
        ("what colour is it?"): its answer is known only after the conversation's own earlier questions."""
        asked = [normalize_answer(q) for q, _ in history]
        said = normalize_answer(message)
        for j, (q, a, t) in enumerate(self.turns):
            if normalize_answer(q) == said and (
                    t not in NEEDS_HISTORY or asked == [normalize_answer(x) for x, _, _ in self.turns[:j]]):
                return a, t
        return None


def scored(reply: str, answer: str, qtype: str) -> bool:
    """Is ``reply`` right? The rule the held-out accuracy in reports/metrics.json is scored by."""
    return vqa_accuracy([(reply, answer, qtype)])["accuracy"] == 1.0


def scene_examples(coco: str | None, conversations: str | None, n: int = N_EXAMPLES) -> list[Example]:
    """The first ``n`` COCO val images of ``coco``, with their reference captions and the held-out
    conversation about each (``conversations``/val.json), where there is one."""
    from vlmpipe.data import llava
    from vlmpipe.data.coco import CocoCaptions

    if not coco or not (Path(coco) / "val2017.zip").is_file():
        if coco:
            log.warning("no %s/val2017.zip: the page offers no held-out scenes", coco)
        return []
    val = CocoCaptions(coco, "val")
    talks: dict[int, list[tuple[str, str, str]]] = {}
    if conversations and (Path(conversations) / "val.json").is_file():
        records, types = llava.load_split(conversations, "val")
        for r in records:
            iid = llava.image_id(r["image"]) if llava.has_image(r) else None
            if iid is not None and iid not in talks:  # the first conversation about an image
                turns = llava.turns_of(r)
                kinds = types.get(str(r["id"])) or llava.default_types(len(turns))
                talks[iid] = [(q, a, t) for (q, a), t in zip(turns, kinds)]
    elif conversations:
        log.warning("no %s/val.json: the scenes come without held-out questions", conversations)
    return [Example(str(i), "scene", val.image(i), val.captions(i), talks.get(i, [])) for i in val.ids[:n]]


def shape_examples(cifar: str | None, qa_csv: str | None, n: int = N_EXAMPLES) -> list[Example]:
    """``n`` held-out rows of the Q/A CSV (validated against the CIFAR images in ``cifar``), each class
    in turn in the CSV's order (every class shown before any twice), with their questions and answers."""
    from PIL import Image

    from vlmpipe.data.cifar import load_split
    from vlmpipe.data.qa import A_COLS, Q_COLS, T_COLS, part, read_qa_csv

    if not qa_csv or not cifar or not Path(qa_csv).is_file() or not Path(cifar).is_dir():
        if qa_csv and cifar:
            log.warning("no %s or %s: the page offers the QA model no held-out images", qa_csv, cifar)
        return []
    by_class: dict[str, list[dict]] = {}
    seen = set()
    for r in part(read_qa_csv(qa_csv, cifar), "test").to_dict("records"):
        key = f"cifar-{r['Split']}-{r['Dataset_Index']}"
        if key not in seen:  # a CSV may have several rows about one image: its first is shown
            seen.add(key)
            by_class.setdefault(r["Class_Label"], []).append({**r, "key": key})
    rows: list[dict] = []
    while len(rows) < n and any(by_class.values()):
        for group in by_class.values():
            if group and len(rows) < n:
                rows.append(group.pop(0))
    splits = {s: load_split(cifar, s) for s in {r["Split"] for r in rows}}
    return [Example(r["key"], "shape", Image.fromarray(splits[r["Split"]].images[r["Dataset_Index"]]), [],
                    [(r[q], r[a], r[t]) for q, a, t in zip(Q_COLS, A_COLS, T_COLS) if r[q]])
            for r in rows]
