"""prepare_qa_base: the QA model's base language model (params ``phi2.base_model``, ``phi2.tiny``,
``seed``; reads data/cifar_qa.csv and data/cifar). For ``base_model: tiny``, a tiny Phi with a BPE
trained on the CSV's training conversations and a short LM warm-up on them, in models/qa_base/lm/;
for a hub model, models/qa_base/base.json names it. No ``lr``: learning-rate experiments reuse it.
"""
from pathlib import Path

from vlmpipe.core.errors import stage_entry
from vlmpipe.core.stage import stage
from vlmpipe.qa import base
from vlmpipe.qa.params import Phi2Params

CSV, CIFAR, OUT = Path("data/cifar_qa.csv"), Path("data/cifar"), Path("models/qa_base")


@stage_entry
def main() -> None:
    with stage("prepare_qa_base", {"phi2": Phi2Params}, device="phi2.train.device") as s:
        base.build(s.p.phi2, seed=s.p.seed, csv_path=CSV, cifar_root=CIFAR, out_dir=OUT)


if __name__ == "__main__":
    raise SystemExit(main())
