"""Prompt templates: how a conversation about an image becomes the tokens a prefix LM reads.

One type; each model owns its instance: ``QA`` in ``models/qa_model.py``, ``CHAT`` in
``models/chat_model.py``::

    [K image prefix vectors]Question: {q1}\\nAnswer: {a1}<eos>Question: {q2}\\nAnswer: {a2}<eos> ...
    [K image prefix vectors]User: {q1}\\nAssistant: {a1}<eos>User: {q2}\\nAssistant: {a2}<eos> ...

Each turn is tokenized piecewise — the user's part (ending where the reply starts), then the reply,
then the EOS id — so the reply's tokens are known exactly: labels cover the reply and its EOS (which
teaches the model to stop), never the user's text or padding. At inference the prompt is the
earlier turns in full, then the user's part (``encode_prompt``): exactly what training saw before
that reply. The image is the prefix, so no ``<image>`` marker appears in the text. The template's
record is saved in the model (``record()``), and a model answers in the template it was trained in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from vlmpipe.models.lm.collate import IGNORE_INDEX


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    user: str                      # the user's part, "{}" where the text goes
    reply: str                     # the reply, "{}" where the text goes (the EOS follows)
    labels: str                    # what the loss is taken on, in words
    keys: tuple[str, str]          # the two parts' names in the saved record
    slots: tuple[str, str]         # and their placeholders there

    def record(self) -> dict:
        """What the saved model records of its template."""
        (user, reply), (su, sr) = self.keys, self.slots
        return {"name": self.name, "image": "K prefix vectors from the projector, before any text",
                user: self.user.replace("{}", "{" + su + "}"), reply: self.reply.replace("{}", "{" + sr + "}"),
                "turn_end": "<eos>", "labels": self.labels}

    def user_text(self, text: str) -> str:
        return self.user.format(" ".join(str(text).split()))

    def reply_text(self, text: str) -> str:
        return self.reply.format(" ".join(str(text).split()))

    def text(self, turns: Sequence[tuple[str, str]], eos_token: str) -> str:
        """A conversation in the template, as plain text (the tiny base's LM warm-up reads these)."""
        return "".join(self.user_text(q) + self.reply_text(a) + eos_token for q, a in turns)

    def encode_turns(self, tokenizer, turns: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """(ids, labels) of each (user, reply) turn."""
        eos = tokenizer.eos_token_id
        out = []
        for q, a in turns:
            q_ids, a_ids = _ids(tokenizer, self.user_text(q)), _ids(tokenizer, self.reply_text(a)) + [eos]
            out.append((q_ids + a_ids, [IGNORE_INDEX] * len(q_ids) + a_ids))
        return out

    def encode_prompt(self, tokenizer, message: str, history: Sequence[tuple[str, str]] = (),
                      max_tokens: int | None = None) -> list[int]:
        """Prompt ids for ``message`` after the earlier ``history`` turns (oldest dropped first if too long)."""
        tail = _ids(tokenizer, self.user_text(message))
        turns = [ids for ids, _ in self.encode_turns(tokenizer, history)]
        while turns and max_tokens is not None and sum(map(len, turns)) + len(tail) > max_tokens:
            turns.pop(0)
        ids = [t for turn in turns for t in turn] + tail
        return ids[-max_tokens:] if max_tokens is not None else ids


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]
