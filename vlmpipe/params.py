"""Typed, validated pipeline parameters.

``params.yaml`` has one section per stage plus top-level ``seed`` and ``lr``
(the Phi-2 QLoRA learning rate, so ``dvc exp run -S lr=1e-4`` works). It is
loaded into the dataclasses below and checked before a stage does any work:
an unknown key, a wrong type or an out-of-range value is a ``UserError`` whose
one line names the key (``siglip.lr: expected a number, got '1e-4' ...``).

Presets (``presets/*.yaml``) are complete params files with the same schema;
nothing in the code branches on which preset is in use.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlmpipe.errors import UserError


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise UserError(f"{key}: {msg}")


def _check_url(url: str, key: str) -> None:
    _check(not url or url.startswith(("http://", "https://")), key, f"must be an http(s) URL, got {url!r}")


# Files and folders of the user's that params name live under inputs/: that folder is a DVC
# dependency of the stages that read them, so editing one reruns what it feeds (a path elsewhere
# would be read, but DVC would never see it change). inputs/data: CSVs and archive copies;
# inputs/models: local model folders.
INPUTS = "inputs"


def _looks_local(name: str) -> bool:
    """A filesystem path rather than a hub id (``gpt2``, ``org/name``)."""
    return name.startswith(("/", ".", "~", f"{INPUTS}/")) or name.count("/") > 1 or "\\" in name


def _check_input_path(value: str, key: str, folder: str) -> None:
    if not value:
        return
    parts = Path(value).parts
    _check(not Path(value).is_absolute() and ".." not in parts and parts[:2] == (INPUTS, folder), key,
           f"{value!r} is outside {INPUTS}/{folder}/: put it (or a link to it) there, so that DVC reruns "
           f"what it feeds when it changes")


def _check_revision(rev: str, key: str) -> None:
    # A branch, tag or commit hash as the hub knows it; no spaces or path tricks.
    _check(bool(rev) and not any(c.isspace() for c in rev) and ".." not in rev, key,
           f"must be a branch, tag or commit hash (e.g. main), got {rev!r}")


@dataclass
class CocoParams:
    # "synthetic": the offline shapes world written in COCO 2017 format;
    # "coco2017": the official archives.
    source: str = "synthetic"
    # Images per split to keep (deterministic subset); 0 keeps all.
    max_images: int = 0
    synthetic_train_images: int = 2000
    synthetic_val_images: int = 250
    image_size: int = 64
    # Where coco2017 comes from. ``url``: a mirror's base URL standing in for
    # http://images.cocodataset.org (same paths below it); ``local_dir``: a folder already
    # holding the three official archives, used in place and never modified; both empty: the
    # official site. ``verify``: check the published size and md5 (false for a mirror or copy
    # that serves other bytes, e.g. a re-packed archive).
    url: str = ""
    local_dir: str = ""
    verify: bool = True

    def validate(self, key: str) -> None:
        _check(self.source in ("synthetic", "coco2017"), f"{key}.source", f"must be 'synthetic' or 'coco2017', got {self.source!r}")
        _check(not (self.url and self.local_dir), f"{key}.local_dir", "set either url or local_dir, not both")
        if not self.verify:  # with verify the published md5 pins the content; without, DVC must watch it
            _check_input_path(self.local_dir, f"{key}.local_dir", "data")
        _check_url(self.url, f"{key}.url")
        _check(self.max_images >= 0, f"{key}.max_images", "must be >= 0")
        _check(self.synthetic_train_images > 0, f"{key}.synthetic_train_images", "must be > 0")
        _check(self.synthetic_val_images > 0, f"{key}.synthetic_val_images", "must be > 0")
        _check(32 <= self.image_size <= 1024, f"{key}.image_size", "must be between 32 and 1024")


@dataclass
class CifarParams:
    # "synthetic": generated 10-class shapes in CIFAR-10 batch format;
    # "cifar10": the official python tarball.
    source: str = "synthetic"
    synthetic_train_per_class: int = 500
    synthetic_test_per_class: int = 100
    # Where cifar10 comes from: ``url``, the full URL of a mirror's cifar-10-python.tar.gz;
    # ``local_path``: a copy of that file on disk (used in place, never modified); both empty:
    # the official site. ``verify``: check the published size and md5.
    url: str = ""
    local_path: str = ""
    verify: bool = True

    def validate(self, key: str) -> None:
        _check(self.source in ("synthetic", "cifar10"), f"{key}.source", f"must be 'synthetic' or 'cifar10', got {self.source!r}")
        _check(not (self.url and self.local_path), f"{key}.local_path", "set either url or local_path, not both")
        if not self.verify:
            _check_input_path(self.local_path, f"{key}.local_path", "data")
        _check_url(self.url, f"{key}.url")
        _check(self.synthetic_train_per_class > 0, f"{key}.synthetic_train_per_class", "must be > 0")
        _check(self.synthetic_test_per_class > 0, f"{key}.synthetic_test_per_class", "must be > 0")


@dataclass
class QaParams:
    # Empty: generate data/cifar_qa.csv. A path: validate and use that CSV.
    csv_path: str = ""
    questions_per_image: int = 5

    def validate(self, key: str) -> None:
        _check(1 <= self.questions_per_image <= 5, f"{key}.questions_per_image", "must be between 1 and 5")
        _check_input_path(self.csv_path, f"{key}.csv_path", "data")


@dataclass
class TrainParams:
    """Settings of the shared training loop, one block per training stage."""

    epochs: int = 1
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    # Save a resumable checkpoint every this many optimizer steps (0: only at the end).
    checkpoint_every: int = 50
    # "auto" picks CUDA when present, else CPU.
    device: str = "auto"
    # Matmul precision: "auto" is bf16 autocast on CUDA (and bf16 4-bit compute for QLoRA),
    # fp32 on a CPU; "bf16" or "fp32" force one (bf16 on a CPU rehearses the CUDA choice).
    precision: str = "auto"
    # CUDA fast paths (no effect on a CPU): TF32 tensor cores for fp32 matmuls and convolutions;
    # AdamW's fused kernel. Both change the last bits of the numbers; switch off to compare.
    tf32: bool = True
    fused_adamw: bool = True
    # torch.compile the model for training (any device; the first steps pay for compilation).
    compile: bool = False
    # DataLoader worker processes (persistent, pinned memory on CUDA); 0 reads in the training process.
    num_workers: int = 0

    def validate(self, key: str) -> None:
        _check(self.epochs >= 1, f"{key}.epochs", "must be >= 1")
        _check(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1")
        _check(self.grad_accum >= 1, f"{key}.grad_accum", "must be >= 1")
        _check(0 < self.lr < 1, f"{key}.lr", f"must be in (0, 1), got {self.lr}")
        _check(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        _check(0 <= self.warmup_ratio < 1, f"{key}.warmup_ratio", "must be in [0, 1)")
        _check(self.grad_clip >= 0, f"{key}.grad_clip", "must be >= 0 (0 disables clipping)")
        _check(self.checkpoint_every >= 0, f"{key}.checkpoint_every", "must be >= 0")
        _check(self.device in ("auto", "cpu", "cuda"), f"{key}.device", "must be 'auto', 'cpu' or 'cuda'")
        _check(self.precision in ("auto", "fp32", "bf16"), f"{key}.precision", "must be 'auto', 'fp32' or 'bf16'")
        _check(0 <= self.num_workers <= 64, f"{key}.num_workers", "must be between 0 and 64")


@dataclass
class SiglipParams:
    # "resnet_small" (widths 16/32/64/128, trains in seconds per epoch on CPU),
    # "resnet18" or "resnet50" (torchvision).
    backbone: str = "resnet_small"
    # Load ImageNet weights for torchvision backbones (needs the weights cached).
    pretrained: bool = False
    # Images are resized to this side before the tower (224 for ImageNet ResNets).
    image_size: int = 32
    embed_dim: int = 512
    # "small": a transformer text encoder trained jointly. Anything else is a
    # Hugging Face model id or path: frozen, masked mean-pooled, projected.
    text_encoder: str = "small"
    # The hub revision of a hub text_encoder (a commit hash pins it; a branch follows it).
    text_encoder_revision: str = "main"
    text_width: int = 128
    text_layers: int = 2
    text_max_tokens: int = 32
    # Byte-level BPE vocabulary of the "small" text tower (>= 512: room beyond the 256 byte symbols).
    text_vocab_size: int = 1024
    # The temperature and bias learn this many times faster than the towers: the bias starts at
    # -10 and must climb several units; at 10x it barely moved in a 12-epoch offline run (zero-shot
    # stayed at chance for 6 epochs), at 100x zero-shot reached 0.8 in 6.
    logit_lr_mult: float = 100.0
    train: TrainParams = field(default_factory=lambda: TrainParams(epochs=24, batch_size=128, lr=2e-3, warmup_ratio=0.05,
                                                                   checkpoint_every=100))

    def validate(self, key: str) -> None:
        _check(self.backbone in ("resnet_small", "resnet18", "resnet50"), f"{key}.backbone", f"unknown backbone {self.backbone!r}")
        _check(16 <= self.image_size <= 512, f"{key}.image_size", "must be between 16 and 512")
        _check(self.embed_dim >= 8, f"{key}.embed_dim", "must be >= 8")
        _check(self.text_width >= 8, f"{key}.text_width", "must be >= 8")
        _check(self.text_layers >= 1, f"{key}.text_layers", "must be >= 1")
        _check(self.text_max_tokens >= 4, f"{key}.text_max_tokens", "must be >= 4")
        _check(self.text_vocab_size >= 512, f"{key}.text_vocab_size", "must be >= 512 (a byte-level BPE needs room beyond its 256 byte symbols)")
        _check(self.logit_lr_mult > 0, f"{key}.logit_lr_mult", "must be > 0")
        _check_revision(self.text_encoder_revision, f"{key}.text_encoder_revision")
        if _looks_local(self.text_encoder):
            _check_input_path(self.text_encoder, f"{key}.text_encoder", "models")


@dataclass
class EmbeddingsParams:
    batch_size: int = 256
    device: str = "auto"
    # Processes reading and decoding the images (COCO JPEGs from the zips); 0: the stage's own.
    num_workers: int = 0

    def validate(self, key: str) -> None:
        _check(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1")
        _check(0 <= self.num_workers <= 64, f"{key}.num_workers", "must be between 0 and 64")
        _check(self.device in ("auto", "cpu", "cuda"), f"{key}.device", "must be 'auto', 'cpu' or 'cuda'")


@dataclass
class TinyLMParams:
    """A small random-init language model built offline in place of a hub model."""

    vocab_size: int = 1024
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    # Full-precision LM warm-up on the project's texts before the base is saved
    # (the offline analogue of starting from pretrained weights).
    warmup_steps: int = 300
    warmup_lr: float = 3e-3

    def validate(self, key: str) -> None:
        _check(self.vocab_size >= 512, f"{key}.vocab_size", "must be >= 512 (a byte-level BPE needs room beyond its 256 byte symbols)")
        _check(self.hidden_size >= 16 and self.hidden_size % self.heads == 0, f"{key}.hidden_size", "must be >= 16 and divisible by heads")
        _check(self.layers >= 1, f"{key}.layers", "must be >= 1")
        _check(self.heads >= 1, f"{key}.heads", "must be >= 1")
        _check(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0")
        _check(0 < self.warmup_lr < 1, f"{key}.warmup_lr", "must be in (0, 1)")


@dataclass
class Phi2Params:
    # "tiny": build a small Phi configuration offline; else a hub id or a path.
    base_model: str = "tiny"
    # Hub revision of base_model: a commit hash pins the exact weights (recorded in the saved model).
    revision: str = "main"
    tiny: TinyLMParams = field(default_factory=TinyLMParams)
    load_in_4bit: bool = True
    prefix_tokens: int = 4
    # Hidden width of the prefix projector's MLP; 0: min(K*H/2, 2*R*D) (see models/projector.py).
    projector_hidden: int = 0
    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.05
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
    train: TrainParams = field(default_factory=lambda: TrainParams(epochs=2, batch_size=32, lr=1e-3, weight_decay=0.0,
                                                                   warmup_ratio=0.05, grad_clip=0.5,
                                                                   checkpoint_every=100))

    def validate(self, key: str) -> None:
        _check(self.prefix_tokens >= 1, f"{key}.prefix_tokens", "must be >= 1")
        _check(self.projector_hidden >= 0, f"{key}.projector_hidden", "must be >= 0 (0: sized from the LM)")
        _check_revision(self.revision, f"{key}.revision")
        if _looks_local(self.base_model):
            _check_input_path(self.base_model, f"{key}.base_model", "models")
        _check(self.lora_r >= 1, f"{key}.lora_r", "must be >= 1")
        _check(self.lora_alpha >= 1, f"{key}.lora_alpha", "must be >= 1")
        _check(0 <= self.lora_dropout < 1, f"{key}.lora_dropout", "must be in [0, 1)")
        _check(len(self.target_modules) > 0, f"{key}.target_modules", "must name at least one module")
        _check(self.attn_implementation in ("sdpa", "eager", "flash_attention_2"), f"{key}.attn_implementation", "must be 'sdpa', 'eager' or 'flash_attention_2'")
        _check(self.max_new_tokens >= 1, f"{key}.max_new_tokens", "must be >= 1")
        _check(self.max_seq_len >= 8, f"{key}.max_seq_len", "must be >= 8")
        _check(self.eval_questions >= 0, f"{key}.eval_questions", "must be >= 0")


@dataclass
class CaptionerParams:
    # "siglip": the trained SigLIP image tower (offline default); else a CLIP
    # hub id or path such as "openai/clip-vit-base-patch16".
    vision_encoder: str = "siglip"
    # Hub revision of a CLIP vision_encoder (a commit hash pins it).
    vision_encoder_revision: str = "main"
    # Features per image: 1 (pooled whole image) or 5 (whole image + 4 quadrants).
    regions: int = 5
    # "tiny": build a small GPT-2 offline; else a hub id or path such as "gpt2".
    lm: str = "tiny"
    # Hub revision of a hub lm (a commit hash pins it).
    lm_revision: str = "main"
    # No LM warm-up: the captioner fine-tunes its whole LM on the captions anyway.
    tiny: TinyLMParams = field(default_factory=lambda: TinyLMParams(warmup_steps=0))
    prefix_tokens: int = 10
    # Hidden width of the prefix projector's MLP; 0: min(K*H/2, 2*R*D) (ClipCap's K*H/2 for small inputs).
    projector_hidden: int = 0
    freeze_lm: bool = False
    max_caption_tokens: int = 40
    beam_size: int = 3
    train: TrainParams = field(default_factory=lambda: TrainParams(epochs=6, batch_size=64, lr=1e-3, warmup_ratio=0.05,
                                                                   checkpoint_every=100))

    def validate(self, key: str) -> None:
        _check(self.regions in (1, 5), f"{key}.regions", "must be 1 or 5")
        _check(self.prefix_tokens >= 1, f"{key}.prefix_tokens", "must be >= 1")
        _check(self.projector_hidden >= 0, f"{key}.projector_hidden", "must be >= 0 (0: sized from the LM)")
        _check_revision(self.vision_encoder_revision, f"{key}.vision_encoder_revision")
        _check_revision(self.lm_revision, f"{key}.lm_revision")
        for name in ("lm", "vision_encoder"):
            if _looks_local(getattr(self, name)):
                _check_input_path(getattr(self, name), f"{key}.{name}", "models")
        _check(self.max_caption_tokens >= 4, f"{key}.max_caption_tokens", "must be >= 4")
        _check(self.beam_size >= 1, f"{key}.beam_size", "must be >= 1 (1 is greedy)")


@dataclass
class ConversationsParams:
    """Where build_conversations gets its LLaVA-Instruct-format conversations (vlmpipe/data/llava.py)."""

    # "synthetic": generated from the shapes-world COCO scenes (needs coco.source: synthetic);
    # "llava_instruct_150k": llava_instruct_150k.json of the hub dataset liuhaotian/LLaVA-Instruct-150K.
    source: str = "synthetic"
    # A LLaVA-format JSON of your own under inputs/data/ (validated, used in place of ``source``).
    path: str = ""
    # synthetic: conversations per COCO image.
    per_image: int = 1
    # llava_instruct_150k: the dataset's hub revision (a commit hash pins the file), or ``url``: a
    # mirror's URL of llava_instruct_150k.json in place of the hub's.
    revision: str = "main"
    url: str = ""
    # Conversations about train2017 images held out for evaluation (by image, seeded) when no
    # conversation is about a val2017 image (LLaVA-Instruct-150K has none).
    heldout_fraction: float = 0.02
    # Keep at most this many training conversations (a seeded subset); 0 keeps all.
    max_conversations: int = 0

    def validate(self, key: str) -> None:
        _check(self.source in ("synthetic", "llava_instruct_150k"), f"{key}.source",
               f"must be 'synthetic' or 'llava_instruct_150k', got {self.source!r}")
        _check_input_path(self.path, f"{key}.path", "data")
        _check(1 <= self.per_image <= 10, f"{key}.per_image", "must be between 1 and 10")
        _check_revision(self.revision, f"{key}.revision")
        _check_url(self.url, f"{key}.url")
        _check(0 < self.heldout_fraction < 1, f"{key}.heldout_fraction", "must be in (0, 1)")
        _check(self.max_conversations >= 0, f"{key}.max_conversations", "must be >= 0")


@dataclass
class ChatParams:
    """train_gpt2_chat: the captioner continued on the conversations (vlmpipe/pipeline/train_chat.py)."""

    # Text tokens per training window (the image prefix not counted); 0: all the LM's positions
    # left after the prefix. Whole turns that do not fit are dropped from the front.
    max_seq_len: int = 0
    max_new_tokens: int = 32
    # Held-out assistant turns answered by greedy generation after each epoch (exact match); 0: none.
    eval_turns: int = 300
    train: TrainParams = field(default_factory=lambda: TrainParams(epochs=3, batch_size=16, lr=2e-3,
                                                                   warmup_ratio=0.05, checkpoint_every=100))

    def validate(self, key: str) -> None:
        _check(self.max_seq_len == 0 or self.max_seq_len >= 16, f"{key}.max_seq_len", "must be 0 (all) or >= 16")
        _check(self.max_new_tokens >= 1, f"{key}.max_new_tokens", "must be >= 1")
        _check(self.eval_turns >= 0, f"{key}.eval_turns", "must be >= 0")


@dataclass
class EvaluateParams:
    # Cap on held-out images scored per model (0: all).
    max_images: int = 0
    gallery_images: int = 8
    device: str = "auto"

    def validate(self, key: str) -> None:
        _check(self.max_images >= 0, f"{key}.max_images", "must be >= 0")
        _check(self.gallery_images >= 0, f"{key}.gallery_images", "must be >= 0")
        _check(self.device in ("auto", "cpu", "cuda"), f"{key}.device", "must be 'auto', 'cpu' or 'cuda'")


def check_endpoint(endpoint: str, key: str) -> None:
    """``endpoint`` is host:port (the first machine's rendezvous), or a ``UserError`` naming ``key``."""
    host, _, port = endpoint.rpartition(":")
    _check(bool(host) and port.isdigit() and 0 < int(port) < 65536, key,
           f"must be host:port of the first machine when nnodes > 1, got {endpoint!r}")


@dataclass
class LaunchParams:
    """How many processes the GPU stages run (``python -m vlmpipe.launch``, see vlmpipe/launch.py)."""

    # Processes per machine (one per GPU); 1 runs the stage script as it is, without torchrun.
    nproc_per_node: int = 1
    # Machines. More than 1 joins a c10d rendezvous at rdzv_endpoint (the first machine's host:port).
    nnodes: int = 1
    rdzv_endpoint: str = ""
    # Seconds to wait for the rendezvous endpoint to answer and for every machine to join.
    rdzv_timeout: int = 60
    # "none": start the other machines' launchers yourself (``python -m vlmpipe.launch --node ...``);
    # "srun": the launcher starts one per machine through SLURM's srun (inside an sbatch allocation).
    fanout: str = "none"

    def validate(self, key: str) -> None:
        _check(self.nproc_per_node >= 1, f"{key}.nproc_per_node", f"must be >= 1, got {self.nproc_per_node}")
        _check(self.nnodes >= 1, f"{key}.nnodes", f"must be >= 1, got {self.nnodes}")
        _check(self.rdzv_timeout >= 1, f"{key}.rdzv_timeout", "must be >= 1 (seconds)")
        _check(self.fanout in ("none", "srun"), f"{key}.fanout", f"must be 'none' or 'srun', got {self.fanout!r}")
        if self.nnodes > 1:
            check_endpoint(self.rdzv_endpoint, f"{key}.rdzv_endpoint")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


@dataclass
class Params:
    seed: int = 0
    # The Phi-2 QLoRA learning rate (top level so ``dvc exp run -S lr=...`` works).
    lr: float = 1e-3
    coco: CocoParams = field(default_factory=CocoParams)
    cifar: CifarParams = field(default_factory=CifarParams)
    qa: QaParams = field(default_factory=QaParams)
    siglip: SiglipParams = field(default_factory=SiglipParams)
    embeddings: EmbeddingsParams = field(default_factory=EmbeddingsParams)
    phi2: Phi2Params = field(default_factory=Phi2Params)
    captioner: CaptionerParams = field(default_factory=CaptionerParams)
    conversations: ConversationsParams = field(default_factory=ConversationsParams)
    chat: ChatParams = field(default_factory=ChatParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    launch: LaunchParams = field(default_factory=LaunchParams)

    def validate(self, key: str = "") -> None:
        # numpy's legacy seeding takes 32 bits; larger seeds would overflow inside the stage.
        _check(0 <= self.seed < 2**32, "seed", f"must be between 0 and {2**32 - 1}")
        _check(0 < self.lr < 1, "lr", f"must be in (0, 1), got {self.lr}")
        c = self.conversations
        _check(c.source != "synthetic" or bool(c.path) or self.coco.source == "synthetic", "conversations.source",
               "synthetic conversations are about the shapes-world scenes and need coco.source: synthetic "
               "(with coco2017 use llava_instruct_150k, or a file of your own in conversations.path)")

    def check_world(self) -> None:
        """Every training stage's global batch splits evenly over launch's processes: checked when
        params load, so a bad count stops the first stage, before any work, not the third after hours."""
        world = self.launch.world_size
        for name in ("siglip", "phi2", "captioner", "chat"):
            t = getattr(self, name).train
            _check(t.batch_size % (world * t.grad_accum) == 0, f"{name}.train.batch_size",
                   f"{t.batch_size} is not divisible by processes x grad_accum = {world} x {t.grad_accum} "
                   f"(launch.nproc_per_node {self.launch.nproc_per_node} x launch.nnodes {self.launch.nnodes})")


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"{value!r} (a string; write numbers without quotes, e.g. 1.0e-4)" if _looks_numeric(value) else repr(value)
    return f"{value!r} ({type(value).__name__})"


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _coerce(value: Any, tp: Any, key: str, default: Any = None) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a section (mapping), got {_describe(value)}")
        return _build(tp, value, key, default)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"{key}: expected a list, got {_describe(value)}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "1e-4" (no dot) as a string; say so instead of
            # failing later inside the optimizer.
            raise UserError(f"{key}: expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{key}: expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported param type {tp!r} at {key}")  # a bug in this module


def _build(cls: type, data: dict, prefix: str, default: Any = None) -> Any:
    """Build ``cls`` from ``data``; keys absent from ``data`` keep ``default``'s values.

    ``default`` matters for nested sections: ``siglip.train`` missing a key
    falls back to SigLIP's training defaults, not the generic TrainParams ones.
    """
    if default is None:
        default = cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise UserError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {f.name: getattr(default, f.name) for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        if f.name in data:
            key = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], key, kwargs[f.name])
    obj = cls(**kwargs)
    obj.validate(prefix)
    for f in dataclasses.fields(cls):
        sub = getattr(obj, f.name)
        if dataclasses.is_dataclass(sub) and f.name not in data:
            sub.validate(f"{prefix}.{f.name}" if prefix else f.name)
    return obj


def from_dict(data: dict) -> Params:
    if not isinstance(data, dict):
        raise UserError("params: the file must be a mapping of sections")
    phi2_train = (data.get("phi2") or {}).get("train") if isinstance(data.get("phi2"), dict) else None
    if isinstance(phi2_train, dict) and "lr" in phi2_train:
        raise UserError("phi2.train.lr: not used; the Phi-2 QLoRA learning rate is the top-level key lr")
    params = _build(Params, data, "")
    params.phi2.train.lr = params.lr
    params.check_world()
    return params


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML keeps the last silently)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)

# Deeper than any params file could sensibly be; a hostile file nested 100k deep would otherwise
# end in a RecursionError traceback inside the YAML parser.
MAX_DEPTH = 16


def _depth(obj: Any, limit: int = MAX_DEPTH) -> int:
    stack, deepest = [(obj, 1)], 0
    while stack:
        o, d = stack.pop()
        deepest = max(deepest, d)
        if d > limit:
            return d
        if isinstance(o, dict):
            stack += [(v, d + 1) for v in o.values()]
        elif isinstance(o, list):
            stack += [(v, d + 1) for v in o]
    return deepest


def load_params(path: str | os.PathLike | None = None) -> Params:
    """Load and validate ``params.yaml`` (or ``$VLMPIPE_PARAMS``); every problem is one ``UserError`` line."""
    path = Path(path or os.environ.get("VLMPIPE_PARAMS") or "params.yaml")
    if not path.exists():
        raise UserError(f"{path}: params file not found (run from the repository root)")
    if not path.is_file():
        raise UserError(f"{path}: not a file (a params file is YAML text)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    # Flow collections nest without indentation; refuse absurd nesting before the parser recurses.
    if max((len(m) for m in re.findall(r"[\[{]+", text)), default=0) > MAX_DEPTH:
        raise UserError(f"{path}: nested more than {MAX_DEPTH} levels deep (not a params file)")
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply (not a params file)") from None
    if data is None:
        raise UserError(f"{path}: empty params file (copy params.yaml or a file from presets/)")
    if _depth(data) > MAX_DEPTH:
        raise UserError(f"{path}: nested more than {MAX_DEPTH} levels deep (not a params file)")
    try:
        return from_dict(data)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (for MLflow params and checkpoint identity)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
