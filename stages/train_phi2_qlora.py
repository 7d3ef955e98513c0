"""train_phi2_qlora: a Phi-2 visual QA model trained with QLoRA on SigLIP prefix tokens.

Reads data/cifar_qa.csv (+ data/cifar to validate it), data/embeddings/cifar_* (cached SigLIP
features), models/siglip (its identity), models/qa_base, params ``phi2``, ``seed``, ``lr``.
Writes models/phi2_vlm/ (``vlmpipe.models.qa_model.load_qa_model``), models/checkpoints/phi2_vlm/
(resumed automatically) and reports/phi2_vlm/ (curves; held-out exact match beside the blind baseline).
"""
from pathlib import Path

from vlmpipe.core.errors import stage_entry
from vlmpipe.core.stage import stage
from vlmpipe.qa import stage as qa
from vlmpipe.qa.params import Phi2Params

CSV, CIFAR, EMBEDDINGS = Path("data/cifar_qa.csv"), Path("data/cifar"), Path("data/embeddings")
SIGLIP, BASE = Path("models/siglip"), Path("models/qa_base")
OUT, CKPT, REPORTS = Path("models/phi2_vlm"), Path("models/checkpoints/phi2_vlm"), Path("reports/phi2_vlm")


@stage_entry
def main() -> None:
    with stage("train_phi2_qlora", {"phi2": Phi2Params},
               device="phi2.train.device", top=("seed", "lr"), model="vqa") as s:
        qa.run_stage(s.p.phi2, lr=s.p.lr, seed=s.p.seed, device=s.device, csv_path=CSV, cifar_root=CIFAR,
                     embeddings_root=EMBEDDINGS, siglip_dir=SIGLIP, base_dir=BASE, out_dir=OUT, ckpt_dir=CKPT,
                     report_dir=REPORTS, run=s.run)
        s.register("qa", OUT)


if __name__ == "__main__":
    raise SystemExit(main())
