"""The captioner in the evaluate_captioner stage: pycocoevalcap scores on the held-out split beside the
constant-caption baseline; on the synthetic shapes world also the scene score (``scene_right``: the
share of scenes whose caption is entirely right, ``scene_shapes_right``: of shapes named right;
``vlmpipe.scoring.scene``), beside the constant caption's; the captions as examples."""
from __future__ import annotations

import logging

import torch

from vlmpipe.data.captions import caption_split
from vlmpipe.data.coco import CocoCaptions
from vlmpipe.models.captioner import load_captioner
from vlmpipe.scoring.metrics import caption_scores, first, most_common_caption, round4
from vlmpipe.scoring.scene import load_scene_facts

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(e, *, captioner_dir, embeddings_root, coco_root, device="cpu") -> tuple[dict, list]:
    """(the ``captioner`` section of reports/metrics.json, the captions) under ``EvaluateParams`` ``e``."""
    cap, examples = evaluate_captioner(captioner_dir, embeddings_root, coco_root, e.max_images, device=device)
    if cap["meteor"] is None:
        log.warning("captioner.meteor is null: %s", cap.get("meteor_skipped"))
    return round4({k: v for k, v in cap.items() if k != "baseline_caption"}), examples


def evaluate_captioner(model_dir, embeddings_root, coco_root, limit: int = 0, meteor: bool = True, device="cpu"):
    """pycocoevalcap scores on the held-out (val) split + the constant-caption baseline, and the scene
    score beside the constant caption's where ``coco_root`` has the scenes' facts (the shapes world).

    Returns (metrics, examples) where examples = [(image id, generated, references)].
    """
    model = load_captioner(model_dir, device=device)
    enc = model.config.encoder
    ids, feats, refs_all, _ = caption_split(coco_root, embeddings_root, "val", enc if enc.get("hash") else None,
                                            model.config.regions)
    n = first(len(ids), limit)
    ids = ids[:n]
    with torch.no_grad():
        generated = model.caption(feats[:n].float())
    refs = dict(zip(ids, refs_all[:n]))
    cands = dict(zip(ids, generated))
    metrics = caption_scores(refs, cands, meteor=meteor)
    train = CocoCaptions(coco_root, "train")
    constant = most_common_caption(c for i in train.ids for c in train.captions(i))
    base = caption_scores(refs, {i: constant for i in ids}, meteor=False)
    metrics.update(baseline_cider=base["cider"], baseline_bleu4=base["bleu4"], baseline_caption=constant,
                   n_images=len(ids))
    facts = load_scene_facts(coco_root, "val")
    if facts is not None:  # the shapes world: each caption checked against its scene's facts
        metrics.update(facts.score(cands))
        metrics.update({f"baseline_{k}": v for k, v in facts.score({i: constant for i in ids}).items()})
    return metrics, [(i, cands[i], refs[i]) for i in ids]
