"""The ``phi2`` section: train_phi2_qlora (its learning rate is the top-level ``lr``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from vlmpipe.core.params import TinyLMParams, TrainParams, check, check_input_path, check_revision, looks_local


@dataclass
class Phi2Params:
    # Keys the section has but params.yaml must not set (nor MLflow show), and why.
    UNUSED: ClassVar[dict] = {"train.lr": "the Phi-2 QLoRA learning rate is the top-level key lr"}
    # "tiny": build a small Phi configuration offline; else a hub id or a path.
    base_model: str = "tiny"
    # Hub revision of base_model: a commit hash pins the exact weights (recorded in the saved model).
    revision: str = "main"
    tiny: TinyLMParams = field(default_factory=TinyLMParams)
    load_in_4bit: bool = True
    prefix_tokens: int = 4
    # Hidden width of the prefix projector's MLP; 0: min(K*H/2, 2*D) (one region; see models/lm/projector.py).
    projector_hidden: int = 0
    # The projector's learning rate as a multiple of the adapters' (the top-level lr): it starts from
    # nothing, while the adapters only nudge a trained LM.
    projector_lr_mult: float = 10.0
    lora_r: int = 32
    lora_alpha: int = 64
    # 0 by default: on a CPU the adapters' dropout masks took 28 % of the QA model's training step
    # (drawing a mask is ~10x the rank-32 matmul it feeds); presets/full.yaml (GPUs) keeps QLoRA's 0.05.
    lora_dropout: float = 0.0
    use_rslora: bool = True
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"])
    # "sdpa" (PyTorch), "eager", or "flash_attention_2" (CUDA with flash-attn installed).
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    max_new_tokens: int = 16
    # Text tokens per conversation (prefix not counted); whole turns beyond it are dropped.
    max_seq_len: int = 192
    # Held-out questions answered by greedy generation after each epoch (exact match); 0: none.
    eval_questions: int = 500
    # The learning rate is the top-level ``lr``.
    train: TrainParams = field(default_factory=lambda: TrainParams(epochs=6, batch_size=32, lr=1e-3, weight_decay=0.1,
                                                                   warmup_ratio=0.05, grad_clip=0.5,
                                                                   checkpoint_every=100))

    def base(self, base_dir: Path) -> str | Path:
        """What the QA model builds on: prepare_qa_base's folder ``base_dir`` holds the tiny base for
        ``base_model: tiny``; otherwise the hub id or folder named here."""
        return Path(base_dir) / "lm" if self.base_model == "tiny" else self.base_model

    def validate(self, key: str) -> None:
        check(self.prefix_tokens >= 1, f"{key}.prefix_tokens", "must be >= 1")
        check(self.projector_hidden >= 0, f"{key}.projector_hidden", "must be >= 0 (0: sized from the LM)")
        check(self.projector_lr_mult > 0, f"{key}.projector_lr_mult", "must be > 0")
        check_revision(self.revision, f"{key}.revision")
        if looks_local(self.base_model):
            check_input_path(self.base_model, f"{key}.base_model", "models")
        check(self.lora_r >= 1, f"{key}.lora_r", "must be >= 1")
        check(self.lora_alpha >= 1, f"{key}.lora_alpha", "must be >= 1")
        check(0 <= self.lora_dropout < 1, f"{key}.lora_dropout", "must be in [0, 1)")
        check(len(self.target_modules) > 0, f"{key}.target_modules", "must name at least one module")
        check(self.attn_implementation in ("sdpa", "eager", "flash_attention_2"), f"{key}.attn_implementation", "must be 'sdpa', 'eager' or 'flash_attention_2'")
        check(self.max_new_tokens >= 1, f"{key}.max_new_tokens", "must be >= 1")
        check(self.max_seq_len >= 8, f"{key}.max_seq_len", "must be >= 8")
        check(self.eval_questions >= 0, f"{key}.eval_questions", "must be >= 0")
