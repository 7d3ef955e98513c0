"""``python -m vlmpipe export MODEL_DIR OUT``: a trained model as one self-contained folder.

- QA model (``kind: qa``): loaded as trained (the base in 4-bit NF4 + the LoRA adapter), each
  bitsandbytes ``Linear4bit`` of the base replaced by an ``nn.Linear`` holding its dequantised
  weight, then the adapter merged in (peft ``merge_and_unload``): the merged weights are the base
  as training saw it (quantised) plus the LoRA delta. The LM is saved whole in ``lm/`` (fp32 when
  merged on a CPU, bf16 on CUDA; no quantization config), beside the projector and tokenizer, with
  ``model.json`` saying ``load_in_4bit: false`` and ``merged``: no adapter, no bitsandbytes, no peft.
- Captioner and chat model: their folder as it is.
- Each gets the image encoder it records (``../siglip``) copied inside and pointed at there, and a
  model card ``README.md``: data, params, held-out metrics beside their baselines, the git commit,
  the DVC experiment, the sha256 of every weight file.

The export is written beside OUT and moved into place at the end: a failed export leaves nothing.

An export loads with the loader of its kind (``load_qa_model``, which reads a merged ``lm/`` in
place of base + adapter), so ``ask``, ``chat``, ``serve`` and ``predict`` take it as they take the
trained folder.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import torch
from torch import nn

from vlmpipe.core.download import file_digest
from vlmpipe.core.errors import UserError
from vlmpipe.core.io import atomic_path, read_json_file, write_json
from vlmpipe.models.lm.prefix_lm import CONFIG_NAME
from vlmpipe.models.qa_model import QAModel, load_qa_model

log = logging.getLogger("vlmpipe.face.export")

KINDS = ("captioner", "qa", "chat")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
# The section of reports/metrics.json a kind's held-out scores are in (when dvc.lock does not say).
METRICS_SECTION = {"qa": "vqa", "captioner": "captioner", "chat": "chat"}


def is_merged(config: dict) -> bool:
    return bool((config.get("extra") or {}).get("merged"))


# ------------------------------------------------------------------ merging

def dequantize_linears(model: nn.Module) -> int:
    """Replace every bitsandbytes ``Linear4bit`` of ``model`` by an ``nn.Linear`` holding its dequantised
    weight (the very values its forward computes with); return how many there were."""
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit

    found = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear4bit)]
    for name, m in found:
        w = dequantize_4bit(m.weight.data, m.weight.quant_state)
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if m.bias is not None:
                lin.bias.copy_(m.bias.data.to(w.dtype))
        model.set_submodule(name, lin)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the config would still say 4-bit, and save_pretrained would write it
        quantizer.remove_quantization_config(model)
    return len(found)


def merge_lora(model: QAModel, adapter_dir: Path, dtype: torch.dtype) -> tuple[nn.Module, int]:
    """The QA model's LM with its LoRA adapter merged into the dequantised base, in ``dtype``."""
    from peft import PeftModel

    base = model.lm.unload()  # the LoRA layers out (nothing merged), the base's own layers back in place
    n = dequantize_linears(base)
    lm = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).merge_and_unload()
    return lm.to(dtype).eval(), n


# ------------------------------------------------------------------ export

def model_config(model_dir: Path) -> dict:
    """The model.json of a captioner, QA or chat model folder, or one line saying it is not one."""
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: not a folder (MODEL_DIR: a trained model folder such as models/phi2_vlm)")
    if not (model_dir / CONFIG_NAME).is_file():
        raise UserError(f"{model_dir}: not a model folder (no {CONFIG_NAME}); export takes a captioner, "
                        "QA or chat model folder such as models/phi2_vlm")
    cfg = read_json_file(model_dir / CONFIG_NAME)
    if cfg.get("kind") not in KINDS:
        raise UserError(f"{model_dir / CONFIG_NAME}: kind {cfg.get('kind')!r}; export takes a captioner, qa or chat model")
    return cfg


def export(model_dir: str | os.PathLike, out: str | os.PathLike, device: str = "auto") -> Path:
    """Write ``model_dir`` as a self-contained folder ``out`` (which must not exist, or be empty)."""
    from vlmpipe.core.runtime import resolve_device

    src, out = Path(model_dir), Path(out)
    cfg = model_config(src)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not empty (export writes a new folder: remove it or name another)")
    if out.resolve().is_relative_to(src.resolve()):
        raise UserError(f"{out}: inside the model folder {src} (name a folder outside it)")
    dev = resolve_device(device, "--device")
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    try:
        with atomic_path(out) as tmp:
            if cfg["kind"] == "qa" and not is_merged(cfg):
                _export_qa(src, tmp, dev, cfg)
            else:
                shutil.copytree(src, tmp)
            _bring_encoder(src, tmp)
            (tmp / "README.md").write_text(model_card(src, tmp), encoding="utf-8")
    except BaseException:
        for p in created:  # folders made for OUT go too: a failed export writes nothing
            try:
                p.rmdir()
            except OSError:
                pass
        raise
    log.info("exported %s to %s", src, out)
    return out


def _export_qa(src: Path, tmp: Path, device: torch.device, cfg: dict) -> None:
    from vlmpipe.core.text import save_tokenizer
    from vlmpipe.face.api import quiet_loading

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with quiet_loading(), warnings.catch_warnings():  # peft's calls of transformers' renamed methods
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*gradient_checkpointing.*")
        model = load_qa_model(src, device)
        lm, n = merge_lora(model, src / "adapter", dtype)
        tmp.mkdir()
        lm.save_pretrained(str(tmp / "lm"), safe_serialization=True)
    save_tokenizer(model.tokenizer, tmp / "lm")  # lm/ alone is a standard Hugging Face model folder
    shutil.copytree(src / "tokenizer", tmp / "tokenizer")
    for f in ("projector.json", "projector.safetensors"):
        shutil.copy2(src / f, tmp / f)
    x = dict(cfg["extra"])
    x["load_in_4bit"] = False
    x["merged"] = {"from": str(src), "lora": x.pop("lora", None), "dtype": str(dtype).removeprefix("torch."),
                   "dequantized_layers": n, "base_was_4bit": bool(cfg["extra"].get("load_in_4bit"))}
    write_json(tmp / CONFIG_NAME, {**cfg, "extra": x})


def _bring_encoder(src: Path, tmp: Path) -> None:
    """Copy the trained image encoder the model records (``../siglip``) into the export and point at it
    there; an encoder inside the folder came with it, a hub encoder is recorded by id and revision."""
    cfg = read_json_file(tmp / CONFIG_NAME)
    rel = (cfg.get("encoder") or {}).get("path")
    if not rel:
        return
    where = (src / rel).resolve()
    if where.is_relative_to(src.resolve()):
        return
    if not (where / "model.safetensors").is_file():
        raise UserError(f"{where}: the image encoder {src} was trained with is missing (run `dvc repro train_siglip`)")
    name = where.name if not (tmp / where.name).exists() else "encoder"
    shutil.copytree(where, tmp / name)
    cfg["encoder"]["path"] = name
    write_json(tmp / CONFIG_NAME, cfg)


# ------------------------------------------------------------------ the model card

def _git(root: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _experiment(root: Path, head: str | None) -> str | None:
    """The DVC experiment the workspace holds: the one running (``DVC_EXP_NAME``), or the one last
    applied with ``dvc exp apply`` on this very commit."""
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    applied = _git(root, "rev-parse", "-q", "--verify", "refs/exps/exec/EXEC_APPLY")
    if not applied or not head:
        return None
    for ref in (_git(root, "for-each-ref", "--points-at", applied, "--format=%(refname)", "refs/exps") or "").split():
        parts = ref.split("/")  # refs/exps/<baseline[:2]>/<baseline[2:]>/<name>
        if len(parts) == 5 and parts[2] != "exec" and parts[2] + parts[3] == head:
            return parts[4]
    return None


def _repo_root(d: Path) -> Path | None:
    d = d.resolve()
    return next((p for p in [d, *d.parents] if (p / "dvc.yaml").is_file()), None)


def _metric_rows(metrics: dict) -> list[tuple[str, float, float | None]]:
    """(metric, value, its baseline) for the scalar held-out metrics; baselines are shown beside theirs."""
    def is_baseline(k: str) -> bool:
        return k.startswith(("baseline_", "blind_")) or k.endswith("_chance") or k == "blind_baseline"

    rows = []
    for k, v in metrics.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or is_baseline(k):
            continue
        base = metrics.get(f"baseline_{k}")
        if base is None and k in ("accuracy", "exact_match"):
            base = metrics.get("blind_baseline")
        if base is None and k in ("i2t_r1", "t2i_r1"):
            base = metrics.get("r1_chance")
        rows.append((k, v, base))
    return rows


def model_card(src: Path, out: Path) -> str:
    """The export's README.md: what it is, how to load it, data, params, metrics, provenance, hashes."""
    import yaml

    cfg = read_json_file(out / CONFIG_NAME)
    kind, x = cfg["kind"], cfg.get("extra") or {}
    title = {"qa": "visual QA model", "captioner": "captioner", "chat": "chat model"}[kind]
    lines = [f"# vlmpipe {title}", "",
             f"Exported with `python -m vlmpipe export` from `{src}`. A prefix language model: image features "
             f"from a frozen encoder → an MLP projector → {cfg['prefix_tokens']} prefix vectors → a causal LM "
             f"(`{cfg['lm_source']}`{'@' + cfg['lm_revision'] if cfg.get('lm_revision') else ''}).", ""]
    enc = cfg.get("encoder") or {}
    where = f"copied into `{enc['path']}/`" if enc.get("path") else f"loaded from the hub at {enc.get('revision', 'main')}"
    lines += [f"- Image encoder: `{enc.get('name')}` (weights hash `{enc.get('hash')}`), {where}; "
              f"{cfg['regions']} region(s) of {cfg['feature_dim']} features per image."]
    if is_merged(cfg):
        m, lora = x["merged"], x["merged"].get("lora") or {}
        lines += [f"- The LoRA adapter (r {lora.get('r')}, alpha {lora.get('alpha')}, rsLoRA {lora.get('use_rslora')}, "
                  f"on {', '.join(lora.get('target_modules') or [])}) is merged into the base: the 4-bit NF4 "
                  f"weights dequantised ({m['dequantized_layers']} layers) plus the LoRA delta, saved in "
                  f"{m['dtype']} in `lm/` (a standard Hugging Face model folder with its tokenizer). "
                  "No adapter, bitsandbytes or peft is needed to load it."]
    lines += ["", "## Loading", "", "```python"]
    if kind == "qa":
        lines += ["from vlmpipe.models.qa_model import load_qa_model", "model = load_qa_model(\"THIS_FOLDER\")  # or: "
                  "python -m vlmpipe predict --model THIS_FOLDER questions.jsonl"]
    else:
        loader = "load_captioner" if kind == "captioner" else "load_chat_model"
        module = "captioner" if kind == "captioner" else "chat_model"
        lines += [f"from vlmpipe.models.{module} import {loader}", f"model = {loader}(\"THIS_FOLDER\")"]
    lines += ["```", ""]

    root = _repo_root(src)
    if root is None:
        lines += ["## Provenance", "", f"`{src}` lies in no DVC repository: data, params and metrics unknown.", ""]
    else:
        lines += _provenance(root, src.resolve().relative_to(root).as_posix(), kind, yaml)
    lines += ["## Weight files (sha256)", "", "| file | sha256 |", "|---|---|"]
    for f in sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        lines.append(f"| `{f.relative_to(out).as_posix()}` | `{file_digest(f, 'sha256')}` |")
    return "\n".join(lines) + "\n"


def _provenance(root: Path, rel: str, kind: str, yaml) -> list[str]:
    lock_path = root / "dvc.lock"
    stages = (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {}) if lock_path.is_file() else {}

    def outs(s: dict) -> list[str]:
        return [o["path"].rstrip("/") for o in s.get("outs") or []]

    train = next(((n, s) for n, s in stages.items() if rel in outs(s)), None)
    lines = ["## Data", ""]
    if train is None:
        lines += [f"`{rel}` is no output dvc.lock records: data and params unknown.", ""]
    else:
        name, s = train
        makers: dict[str, dict] = {}  # the data stages, each with its params, said once
        for d in s.get("deps") or []:
            if not d["path"].startswith("data/"):
                continue
            maker = next(((n, t) for n, t in stages.items() if d["path"].rstrip("/") in outs(t)), None)
            if maker:
                makers[maker[0]] = (maker[1].get("params") or {}).get("params.yaml") or {}
            lines.append(f"- `{d['path']}`: md5 `{d.get('md5')}`, {d.get('size', '?')} bytes"
                         + (f", written by `{maker[0]}`" if maker else ""))
        if makers:
            lines += ["", "The data stages' params:", ""] + [f"- `{n}`: {_flat(p) or 'none'}" for n, p in makers.items()]
        params = (s.get("params") or {}).get("params.yaml") or {}
        lines += ["", "## Training params", "", f"Stage `{name}`, as dvc.lock records them:", "", "```yaml",
                  yaml.safe_dump(params, sort_keys=False).rstrip(), "```"]
    lines += ["", "## Held-out metrics", ""]
    metrics, source = None, ""
    for n, s in stages.items():
        ev = [o for o in outs(s) if o.startswith("reports/eval/")]
        if ev and any(d["path"].rstrip("/") == rel for d in s.get("deps") or []) and (root / ev[0]).is_file():
            metrics, source = json.loads((root / ev[0]).read_text()).get("metrics"), f"`{ev[0]}` (stage `{n}`)"
            break
    if metrics is None and (root / "reports/metrics.json").is_file():
        metrics = json.loads((root / "reports/metrics.json").read_text()).get(METRICS_SECTION[kind])
        source = f"`reports/metrics.json`, section `{METRICS_SECTION[kind]}`"
    if metrics:
        lines += [f"From {source} of the repository at export time.", "", "| metric | value | baseline |",
                  "|---|---|---|"]
        lines += [f"| {k} | {v:.4g} | {'' if b is None else f'{b:.4g}'} |" for k, v, b in _metric_rows(metrics)]
    else:
        lines.append("None found (no evaluation in reports/eval/ or reports/metrics.json).")
    head = _git(root, "rev-parse", "HEAD")
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    exp = _experiment(root, head)
    lines += ["", "## Provenance", "",
              f"- Git commit: `{head or 'unknown (not a git repository)'}`"
              + (" (the working tree had uncommitted changes)" if dirty else ""),
              f"- DVC experiment: {f'`{exp}`' if exp else 'none (a dvc repro run, or no experiment applied here)'}",
              ""]
    return lines


def _flat(d: dict, prefix: str = "") -> str:
    """``{"coco": {"source": "synthetic"}}`` as ``coco.source=synthetic`` (a data stage's params in one line)."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out.append(_flat(v, f"{prefix}{k}."))
        else:
            out.append(f"{prefix}{k}={v if v != '' else chr(39) * 2}")
    return ", ".join(o for o in out if o)
