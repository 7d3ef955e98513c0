"""The body of train_phi2_qlora: the QA model on the Q/A CSV's conversations and cached SigLIP features."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmpipe.data import features as embeddings
from vlmpipe.data.conversations import QADataset, frame_conversations
from vlmpipe.data.qa import part, read_qa_csv
from vlmpipe.core.errors import UserError
from vlmpipe.scoring.metrics import normalize_answer, vqa_accuracy
from vlmpipe.qa.heldout import blind_baseline, qa_scores
from vlmpipe.scoring.heldout import eval_questions, predict_turns
from vlmpipe.core.io import relative_path, read_json, write_json
from vlmpipe.models.qa_model import build_qa_model
from vlmpipe.core.params import to_dict
from vlmpipe.core.runtime import is_main_process
from vlmpipe.loop.train import FitResult, TrainTask, decay_groups, fingerprint, fit, mfu_text

log = logging.getLogger(__name__)


def qa_data(csv_path: Path, cifar_root: Path, embeddings_root: Path, encoder: dict):
    """(the Q/A CSV, then for its training rows and its held-out ones: the conversations, their question
    types and the cached features of their images, made by ``encoder``)."""
    df = read_qa_csv(csv_path, cifar_root)
    out = [df]
    for name in ("train", "test"):
        idx, convs, types = frame_conversations(df, name)
        if not convs:  # build_cifar_qa_csv writes both; a hand-edited copy may lack one
            raise UserError(f"{csv_path}: no {'training' if name == 'train' else 'held-out'} rows; rerun "
                            f"build_cifar_qa_csv")
        splits = part(df, name)["Split"].tolist()
        out.append((convs, types, embeddings.cifar_features(embeddings_root, splits, idx, encoder, csv_path)))
    return tuple(out)


def param_groups(model: nn.Module, lr: float, weight_decay: float, projector_lr_mult: float) -> list[dict]:
    """The adapters at ``lr`` (group 0, the one logged), the projector at ``lr * projector_lr_mult``;
    each as the loop's decay groups (weight decay on matrices only)."""
    projector = {id(q) for q in model.projector.parameters()}
    trainable = [q for q in model.parameters() if q.requires_grad]
    adapters = [q for q in trainable if id(q) not in projector]
    groups = (decay_groups(adapters, lr, weight_decay)
              + decay_groups([q for q in trainable if id(q) in projector], lr * projector_lr_mult, weight_decay))
    return [g for g in groups if g["params"]]


def run_stage(p, *, lr: float, seed: int, device: torch.device, csv_path: Path, cifar_root: Path, embeddings_root: Path,
              siglip_dir: Path, base_dir: Path, out_dir: Path, ckpt_dir: Path, report_dir: Path,
              run: Any = None) -> FitResult:
    """The QA model (``Phi2Params`` ``p``, learning rate ``lr``: the top-level key) on the Q/A CSV's
    conversations and the cached SigLIP features, on ``device`` (under torchrun: the rank's GPU).

    For ``base_model: tiny`` the base is the warmed-up tiny Phi in ``base_dir`` (prepare_qa_base).
    ``res.metrics`` ends with the held-out exact match beside the blind baseline, by question type.
    """
    # The cache must come from the trained SigLIP that `ask` will featurise new images with.
    encoder = {**embeddings.siglip_identity(siglip_dir), "path": relative_path(siglip_dir, out_dir)}
    df, (tr_convs, _, tr_feats), (te_convs, te_types, te_feats) = qa_data(csv_path, cifar_root, embeddings_root,
                                                                          encoder)
    model = build_qa_model(p, p.base(base_dir), device, encoder=encoder, feature_dim=int(tr_feats.shape[-1]),
                           regions=int(tr_feats.shape[1]), seed=seed)
    train = QADataset(model.tokenizer, tr_feats, tr_convs, p.max_seq_len)
    val = QADataset(model.tokenizer, te_feats, te_convs, p.max_seq_len)
    questions = eval_questions(val, p.eval_questions, seed)
    # The greedy answers of the latest evaluation: after the last epoch they are the final model's, and
    # the by-type scores below reuse them instead of answering the same held-out questions again.
    answers: list[str] = []
    counts = model.trainable_counts()
    log.info("phi2_vlm: %d train / %d held-out conversations, %d Q/A turns; trainable: %.2fM LoRA + %.2fM "
             "projector, base %s in %s", len(train), len(val), sum(map(len, tr_convs)), counts["lora_params"] / 1e6,
             counts["projector_params"] / 1e6, p.base_model, "4-bit NF4" if p.load_in_4bit else "full precision")
    task = TrainTask("phi2_vlm", model, train, model.pack, optimizer="paged_adamw",
                     param_groups=lambda m, lr: param_groups(m, lr, p.train.weight_decay, p.projector_lr_mult),
                     evaluate=lambda m, epoch: qa_scores(m, val, 64, questions, answers))
    cifar_feats = sorted(Path(embeddings_root).glob("cifar_*"))  # not the COCO files: the captioner's params
    res = fit(task, dataclasses.replace(p.train, lr=lr), seed=seed, ckpt_dir=ckpt_dir, report_dir=report_dir,
              identity={"phi2": to_dict(p), "lr": lr, "data": fingerprint(csv_path, *cifar_feats, base_dir)}, run=run)
    if not is_main_process():
        return res
    model.save(out_dir)

    # Final held-out scores next to the blind baseline, on the same questions.
    metrics: dict[str, Any] = {**res.metrics, **counts}
    if questions:
        blind = blind_baseline(df)
        truth = [(te_convs[i][j][0], te_convs[i][j][1], te_types[i][j]) for i, j in questions]
        # No answers when this process resumed after the last evaluation: then it generates them.
        final = answers or predict_turns(model, val, questions)
        acc = vqa_accuracy([(pr, a, t) for pr, (_, a, t) in zip(final, truth)])
        metrics.update(exact_match=acc["accuracy"], exact_match_by_type=acc["by_type"], eval_questions=len(questions),
                       blind_exact_match=sum(normalize_answer(blind(q, t)) == normalize_answer(a)
                                             for q, a, t in truth) / len(truth))
    report = Path(report_dir) / "metrics.json"
    write_json(report, {**(read_json(report) if report.exists() else {}), **metrics})
    if run is not None:
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        run.log_artifact(report)
    res.metrics = metrics
    log.info("phi2_vlm: held-out exact match %.3f (blind baseline %.3f), val_loss %.4f; %.0f tokens/s, MFU %s",
             metrics.get("exact_match", float("nan")), metrics.get("blind_exact_match", float("nan")),
             metrics.get("val_loss", float("nan")), res.tokens_per_s, mfu_text(res.speed))
    return res
