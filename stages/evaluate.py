"""evaluate: every model on held-out data, beside its baseline; plots and a gallery.

Reads:  models/{siglip,phi2_vlm,captioner}, data/embeddings, data/coco, data/cifar,
        data/cifar_qa.csv, reports/*/ (training curves), params ``evaluate``.
Writes: reports/metrics.json (siglip / vqa / captioner sections, each metric next to its
        baseline or chance level), reports/plots/*.png, reports/gallery.{png,html};
        the same to MLflow.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from vlmpipe.errors import UserError, stage_entry

CSV, CIFAR, COCO, EMB = Path("data/cifar_qa.csv"), Path("data/cifar"), Path("data/coco"), Path("data/embeddings")
SIGLIP, PHI, CAPTIONER = Path("models/siglip"), Path("models/phi2_vlm"), Path("models/captioner")
REPORTS = Path("reports")
log = logging.getLogger("evaluate")


@stage_entry
def main() -> None:
    t0 = time.perf_counter()
    import torch

    from vlmpipe import heldout
    from vlmpipe import report
    from vlmpipe.data.cifar import load_split
    from vlmpipe.data.coco import CocoCaptions
    from vlmpipe.data.qa import read_qa_csv
    from vlmpipe.io import write_json
    from vlmpipe.params import flatten, load_params, to_dict
    from vlmpipe.runtime import resolve_device, seed_everything
    from vlmpipe.sources import preflight
    from vlmpipe.tracking import stage_run

    p = load_params()
    preflight("evaluate", p)  # anything this or a later stage cannot fetch: one line now
    e = p.evaluate
    seed_everything(p.seed)
    device = resolve_device(e.device, "evaluate.device")
    torch.set_grad_enabled(False)
    for need in (CSV, CIFAR, COCO, EMB, SIGLIP, PHI, CAPTIONER):
        if not need.exists():
            raise UserError(f"{need}: missing upstream output (run `dvc repro` to build it)")

    with stage_run("evaluate", flatten({"evaluate": to_dict(e)})) as run:
        df = read_qa_csv(CSV, CIFAR)
        log.info("scoring SigLIP on %s", device)
        sig = heldout.evaluate_siglip(SIGLIP, CIFAR, df, e.max_images, device=device)
        log.info("scoring the QA model")
        vqa, qa_examples = heldout.evaluate_vqa(PHI, EMB, df, e.max_images, csv_path=str(CSV), device=device)
        log.info("scoring the captioner")
        cap, cap_examples = heldout.evaluate_captioner(CAPTIONER, EMB, COCO, e.max_images, device=device)

        metrics = {
            "siglip": {k: round(v, 4) for k, v in sig.items()},
            "vqa": {"accuracy": round(vqa["accuracy"], 4), "blind_baseline": round(vqa["blind_baseline"], 4),
                    "n_questions": vqa["n_questions"],
                    "by_type": {k: round(v, 4) for k, v in vqa["by_type"].items()},
                    "blind_by_type": {k: round(v, 4) for k, v in vqa["blind_by_type"].items()}},
            "captioner": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in cap.items()
                          if k not in ("baseline_caption",)},
        }
        if metrics["captioner"]["meteor"] is None:
            log.warning("captioner.meteor is null: %s", cap.get("meteor_skipped"))
        write_json(REPORTS / "metrics.json", metrics)

        plots = REPORTS / "plots"
        report.plot_curves({"siglip": REPORTS / "siglip", "phi2_vlm": REPORTS / "phi2_vlm",
                            "captioner": REPORTS / "captioner"}, plots)
        report.plot_baselines([
            ("SigLIP zero-shot", sig["zero_shot_acc"], sig["zero_shot_chance"]),
            # (no retrieval over fewer than two held-out images: evaluate.max_images 1)
            *([("SigLIP i2t R@1", sig["i2t_r1"], sig["r1_chance"])] if "i2t_r1" in sig else []),
            ("VQA accuracy", vqa["accuracy"], vqa["blind_baseline"]),
            ("CIDEr", cap["cider"], cap["baseline_cider"]),
            ("BLEU-4", cap["bleu4"], cap["baseline_bleu4"]),
        ], plots / "baselines.png")

        n = e.gallery_images
        coco_val, cifar_test = CocoCaptions(COCO, "val"), load_split(CIFAR, "test")
        from PIL import Image

        caps = [report.CaptionExample(coco_val.image(i), g, refs) for i, g, refs in cap_examples[:n]]
        qa = [report.QAExample(Image.fromarray(cifar_test.images[idx]), label, [(q, a, t) for q, a, t, _ in turns])
              for idx, label, turns in qa_examples[:n]]
        report.gallery_png(caps, qa, REPORTS / "gallery.png")
        report.gallery_html(caps, qa, metrics, REPORTS / "gallery.html")

        run.log_metrics({k: v for k, v in flatten(metrics).items() if isinstance(v, (int, float))})
        for f in [REPORTS / "metrics.json", REPORTS / "gallery.png", REPORTS / "gallery.html", *plots.glob("*.png")]:
            run.log_artifact(f, "reports")
    log.info("evaluate done in %.0fs | zero-shot %.3f (chance %.3f) | VQA %.3f (blind %.3f) | "
             "CIDEr %.3f (constant caption %.3f)", time.perf_counter() - t0, sig["zero_shot_acc"],
             sig["zero_shot_chance"], vqa["accuracy"], vqa["blind_baseline"], cap["cider"], cap["baseline_cider"])


if __name__ == "__main__":
    raise SystemExit(main())
