"""train_gpt2_captioner: a ClipCap-style captioner (frozen features -> MLP prefix -> GPT-2).

Reads data/embeddings/coco_* (cached features of ``captioner.vision_encoder``), data/coco (reference
captions), models/siglip (its identity, when the encoder is SigLIP), params ``captioner`` and ``seed``.
Writes models/captioner/ (``vlmpipe.models.captioner.load_captioner``), models/checkpoints/captioner/
(resumed automatically) and reports/captioner/ (curves, validation loss).
"""
from pathlib import Path

from vlmpipe.captioner import stage as captioner
from vlmpipe.captioner.params import CaptionerParams
from vlmpipe.core.errors import stage_entry
from vlmpipe.core.stage import stage

COCO, EMBEDDINGS, SIGLIP = Path("data/coco"), Path("data/embeddings"), Path("models/siglip")
OUT, CKPT, REPORTS = Path("models/captioner"), Path("models/checkpoints/captioner"), Path("reports/captioner")


@stage_entry
def main() -> None:
    with stage("train_gpt2_captioner", {"captioner": CaptionerParams},
               device="captioner.train.device", model="captioner") as s:
        captioner.run_stage(s.p.captioner, seed=s.p.seed, coco_root=COCO, embeddings_root=EMBEDDINGS,
                            siglip_dir=SIGLIP, out_dir=OUT, ckpt_dir=CKPT, report_dir=REPORTS, run=s.run)
        s.register("captioner", OUT)


if __name__ == "__main__":
    raise SystemExit(main())
