"""The QA model's base language model, prepared once by its own stage (prepare_qa_base).

For ``phi2.base_model: tiny`` that is the offline default's tiny Phi: a byte-level BPE trained on the
Q/A CSV's training conversations in the QA template, and a short full-precision LM warm-up on them
(``vlmpipe.loop.tiny_base``), saved like a hub checkpoint. It reads neither ``lr`` nor the LoRA
settings, so ``dvc exp run -S lr=...`` reuses it and retrains only the adapters. For a hub id or a
folder the stage records which base and revision the QA stage will load, and nothing else.
"""
from __future__ import annotations

import logging
from pathlib import Path

from vlmpipe.core.io import atomic_path, write_json
from vlmpipe.core.text import EOS
from vlmpipe.data.conversations import frame_conversations
from vlmpipe.data.qa import read_qa_csv
from vlmpipe.loop import tiny_base
from vlmpipe.models.qa_model import QA

log = logging.getLogger(__name__)

RECORD = "base.json"


def build(p, *, seed: int, csv_path: Path, cifar_root: Path, out_dir: Path) -> None:
    """``out_dir``: ``base.json`` naming the base of ``Phi2Params`` ``p``, and in ``lm/`` the tiny base itself."""
    with atomic_path(out_dir) as tmp:
        if p.base_model == "tiny":
            _, convs, _ = frame_conversations(read_qa_csv(csv_path, cifar_root), "train")
            texts = [QA.text(c, EOS)[: -len(EOS)] for c in convs]  # the warm-up appends EOS
            tiny_base.build("phi", p.tiny, texts, Path(tmp) / "lm", seed, device=p.train.device)
        write_json(Path(tmp) / RECORD, {"base_model": p.base_model, "revision": p.revision})
