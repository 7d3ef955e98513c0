"""Typed, validated pipeline parameters: the loader and its checks.

``params.yaml`` has one section per stage plus top-level ``seed`` and ``lr``
(the Phi-2 QLoRA learning rate, so ``dvc exp run -S lr=1e-4`` works). Each
section is a dataclass defined where it is read (``vlmpipe/<wing>/params.py``,
``vlmpipe/sources/params.py``; the loop's ``TrainParams``, ``TinyLMParams`` and
``LaunchParams`` here). A stage loads the sections it reads with
``load_params({"siglip": SiglipParams})``, checked before it does any work: an
unknown key, a wrong type or an out-of-range value is a ``UserError`` whose one
line names the key (``siglip.train.epochs: expected an integer, got 'many'``).

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
from typing import Any, Mapping

import yaml

from vlmpipe.core.errors import UserError


def check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise UserError(f"{key}: {msg}")


def check_url(url: str, key: str) -> None:
    check(not url or url.startswith(("http://", "https://")), key, f"must be an http(s) URL, got {url!r}")


# Files and folders of the user's that params name live under inputs/: that folder is a DVC
# dependency of the stages that read them, so editing one reruns what it feeds (a path elsewhere
# would be read, but DVC would never see it change). inputs/data: CSVs and archive copies;
# inputs/models: local model folders.
INPUTS = "inputs"


def looks_local(name: str) -> bool:
    """A filesystem path rather than a hub id (``gpt2``, ``org/name``)."""
    return name.startswith(("/", ".", "~", f"{INPUTS}/")) or name.count("/") > 1 or "\\" in name


def check_input_path(value: str, key: str, folder: str) -> None:
    if not value:
        return
    parts = Path(value).parts
    check(not Path(value).is_absolute() and ".." not in parts and parts[:2] == (INPUTS, folder), key,
          f"{value!r} is outside {INPUTS}/{folder}/: put it (or a link to it) there, so that DVC reruns "
          f"what it feeds when it changes")


def check_revision(rev: str, key: str) -> None:
    # A branch, tag or commit hash as the hub knows it; no spaces or path tricks.
    check(bool(rev) and not any(c.isspace() for c in rev) and ".." not in rev, key,
          f"must be a branch, tag or commit hash (e.g. main), got {rev!r}")


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
        check(self.epochs >= 1, f"{key}.epochs", "must be >= 1")
        check(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1")
        check(self.grad_accum >= 1, f"{key}.grad_accum", "must be >= 1")
        check(0 < self.lr < 1, f"{key}.lr", f"must be in (0, 1), got {self.lr}")
        check(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        check(0 <= self.warmup_ratio < 1, f"{key}.warmup_ratio", "must be in [0, 1)")
        check(self.grad_clip >= 0, f"{key}.grad_clip", "must be >= 0 (0 disables clipping)")
        check(self.checkpoint_every >= 0, f"{key}.checkpoint_every", "must be >= 0")
        check(self.device in ("auto", "cpu", "cuda"), f"{key}.device", "must be 'auto', 'cpu' or 'cuda'")
        check(self.precision in ("auto", "fp32", "bf16"), f"{key}.precision", "must be 'auto', 'fp32' or 'bf16'")
        check(0 <= self.num_workers <= 64, f"{key}.num_workers", "must be between 0 and 64")


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
        check(self.vocab_size >= 512, f"{key}.vocab_size", "must be >= 512 (a byte-level BPE needs room beyond its 256 byte symbols)")
        check(self.hidden_size >= 16 and self.hidden_size % self.heads == 0, f"{key}.hidden_size", "must be >= 16 and divisible by heads")
        check(self.layers >= 1, f"{key}.layers", "must be >= 1")
        check(self.heads >= 1, f"{key}.heads", "must be >= 1")
        check(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0")
        check(0 < self.warmup_lr < 1, f"{key}.warmup_lr", "must be in (0, 1)")


def check_endpoint(endpoint: str, key: str) -> None:
    """``endpoint`` is host:port (the first machine's rendezvous), or a ``UserError`` naming ``key``."""
    host, _, port = endpoint.rpartition(":")
    check(bool(host) and port.isdigit() and 0 < int(port) < 65536, key,
          f"must be host:port of the first machine when nnodes > 1, got {endpoint!r}")


@dataclass
class LaunchParams:
    """How many processes the GPU stages run (``python -m vlmpipe.loop.launch``, see vlmpipe/loop/launch.py)."""

    # Processes per machine (one per GPU); 1 runs the stage script as it is, without torchrun.
    nproc_per_node: int = 1
    # Machines. More than 1 joins a c10d rendezvous at rdzv_endpoint (the first machine's host:port).
    nnodes: int = 1
    rdzv_endpoint: str = ""
    # Seconds to wait for the rendezvous endpoint to answer and for every machine to join.
    rdzv_timeout: int = 60
    # "none": start the other machines' launchers yourself (``python -m vlmpipe.loop.launch --node ...``);
    # "srun": the launcher starts one per machine through SLURM's srun (inside an sbatch allocation).
    fanout: str = "none"

    def validate(self, key: str) -> None:
        check(self.nproc_per_node >= 1, f"{key}.nproc_per_node", f"must be >= 1, got {self.nproc_per_node}")
        check(self.nnodes >= 1, f"{key}.nnodes", f"must be >= 1, got {self.nnodes}")
        check(self.rdzv_timeout >= 1, f"{key}.rdzv_timeout", "must be >= 1 (seconds)")
        check(self.fanout in ("none", "srun"), f"{key}.fanout", f"must be 'none' or 'srun', got {self.fanout!r}")
        if self.nnodes > 1:
            check_endpoint(self.rdzv_endpoint, f"{key}.rdzv_endpoint")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


# The top-level keys of params.yaml besides ``seed`` and ``lr``: one section per stage (or group of
# stages), each defined by the part of vlmpipe that reads it (``vlmpipe/<wing>/params.py``,
# ``vlmpipe/sources/params.py``). A stage loads the sections it reads; every other known section is
# left unread here, so editing one wing's params class touches no other stage. The preflight loads
# them all (``vlmpipe.ops.preflight.ALL_SECTIONS``), so a mistake anywhere stops the first stage.
SECTIONS = ("coco", "cifar", "qa", "siglip", "embeddings", "phi2", "captioner", "conversations", "chat", "evaluate",
            "launch", "checkpoints")  # checkpoints: where checkpoints are also kept (vlmpipe/ops; no stage reads it)


def params_class(sections: Mapping[str, type]) -> type:
    """The dataclass of a params file as one stage reads it: ``seed``, ``lr``, ``launch`` and ``sections``."""
    fields = [("seed", int, field(default=0)),
              # The Phi-2 QLoRA learning rate (top level so ``dvc exp run -S lr=...`` works).
              ("lr", float, field(default=1e-3))]
    fields += [(name, cls, field(default_factory=cls)) for name, cls in {**sections, "launch": LaunchParams}.items()]
    return dataclasses.make_dataclass("Params", fields, namespace={"validate": _validate_top})


def _validate_top(self, key: str = "") -> None:
    # numpy's legacy seeding takes 32 bits; larger seeds would overflow inside the stage.
    check(0 <= self.seed < 2**32, "seed", f"must be between 0 and {2**32 - 1}")
    check(0 < self.lr < 1, "lr", f"must be in (0, 1), got {self.lr}")
    coco, c = getattr(self, "coco", None), getattr(self, "conversations", None)
    if coco is not None and c is not None:
        check(c.source != "synthetic" or bool(c.path) or coco.source == "synthetic", "conversations.source",
              "synthetic conversations are about the shapes-world scenes and need coco.source: synthetic "
              "(with coco2017 use llava_instruct_150k, or a file of your own in conversations.path)")


def check_world(params: Any) -> None:
    """Every loaded training section's global batch splits evenly over launch's processes: checked
    when params load, so a bad count stops the first stage, before any work, not the third after hours."""
    launch = params.launch
    world = launch.world_size
    for f in dataclasses.fields(params):
        t = getattr(getattr(params, f.name), "train", None)
        if isinstance(t, TrainParams):
            check(t.batch_size % (world * t.grad_accum) == 0, f"{f.name}.train.batch_size",
                  f"{t.batch_size} is not divisible by processes x grad_accum = {world} x {t.grad_accum} "
                  f"(launch.nproc_per_node {launch.nproc_per_node} x launch.nnodes {launch.nnodes})")


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
            # A quoted "1e-4" is a string: say so instead of failing later inside the optimizer.
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
    for key, why in getattr(cls, "UNUSED", {}).items():  # a key the section has but the file must not set
        head, _, rest = key.partition(".")
        if isinstance(data.get(head), dict) and rest in data[head]:
            raise UserError(f"{prefix}.{key}: not used; {why}")
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


def from_dict(data: dict, sections: Mapping[str, type]) -> Any:
    """Build and check the params of ``sections`` (name -> dataclass) from ``data``; the file's other
    known sections are not read, an unknown top-level key is an error."""
    if not isinstance(data, dict):
        raise UserError("params: the file must be a mapping of sections")
    known = ("seed", "lr", *SECTIONS)
    for k in data:
        if k not in known:
            raise UserError(f"{k}: unknown key (known: {', '.join(sorted(known))})")
    cls = params_class(sections)
    names = {f.name for f in dataclasses.fields(cls)}
    params = _build(cls, {k: v for k, v in data.items() if k in names}, "")
    check_world(params)
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
# YAML 1.1 (PyYAML) reads ``2e-4`` without a dot as a string; YAML 1.2, which DVC reads params.yaml
# with, reads it as a number, and so do users. Read it as DVC does: one value, one meaning.
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                    list("-+0123456789."))

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


def load_params(sections: Mapping[str, type], path: str | os.PathLike | None = None) -> Any:
    """Load ``params.yaml`` (or ``$VLMPIPE_PARAMS``) and check ``seed``, ``lr``, ``launch`` and ``sections``;
    every problem is one ``UserError`` line."""
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
        return from_dict(data, sections)
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
