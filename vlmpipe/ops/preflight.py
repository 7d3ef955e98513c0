"""What the params make the pipeline fetch from the network, checked before a stage starts work.

A preset names archives (COCO 2017, CIFAR-10), hub models (Phi-2, GPT-2, CLIP)
and torchvision weights. Each stage fetches its own when it runs, the way
users expect (cached, resumable). But on an offline machine, or with a
mistyped mirror, finding out in ``train_phi2_qlora`` after a 20 GB COCO
download wastes an hour. So every stage first runs ``preflight``: it lists
what this stage and every stage still to come will need, and for each thing
that is not on disk yet checks in seconds that its server can be reached
(and, for a hub model, that the revision exists). What cannot be had is one
line naming each missing thing, where to put it by hand and the param that
chose it — within the first seconds of ``dvc repro``.

"Still to come": the stages that are not upstream of this one and whose
outputs do not all exist yet (read from ``dvc.yaml``). Stages upstream have
run already; their inputs (say, the COCO archives) may be gone on purpose.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from vlmpipe.captioner.params import CaptionerParams
from vlmpipe.chat.params import ChatParams
from vlmpipe.core import hub
from vlmpipe.core.download import default_download_dir
from vlmpipe.sources import remote
from vlmpipe.core.errors import UserError
from vlmpipe.core.params import load_params
from vlmpipe.ops.checkpoint_sync import CheckpointsParams
from vlmpipe.sources.params import CifarParams, CocoParams, ConversationsParams, QaParams
from vlmpipe.embeddings.params import EmbeddingsParams
from vlmpipe.evaluate.params import EvaluateParams
from vlmpipe.qa.params import Phi2Params
from vlmpipe.siglip.params import SiglipParams

log = logging.getLogger(__name__)

# Every section of params.yaml with the class that checks it (``launch`` is core's).
ALL_SECTIONS = {"coco": CocoParams, "cifar": CifarParams, "qa": QaParams, "siglip": SiglipParams,
                "embeddings": EmbeddingsParams, "phi2": Phi2Params, "captioner": CaptionerParams,
                "conversations": ConversationsParams, "chat": ChatParams, "evaluate": EvaluateParams,
                "checkpoints": CheckpointsParams}


def load_all(path=None):
    """The whole params file, every section checked: a mistake in a later stage's section stops the
    first stage, before any work."""
    return load_params(ALL_SECTIONS, path)


@dataclass
class Need:
    key: str                      # the param that makes the pipeline need it
    what: str                     # what it is, as the user would look for it
    present: Callable[[], bool]   # already on disk?
    problem: Callable[[], str | None]  # why it cannot be fetched now (None: it can)


def _url_need(key: str, what: str, path: Path, url: str, hint: str) -> Need:
    def problem() -> str | None:
        why = hub.host_reachable(url)
        return f"{why}; {hint}" if why else None
    return Need(key, what, path.is_file, problem)


def _hub_need(key: str, name: str, revision: str) -> Need:
    def problem() -> str | None:
        why = hub.hub_unreachable()
        if why:
            return f"not in the Hugging Face cache and the hub cannot be reached ({why}); {hub.fetch_hint(name, revision)}"
        return _remote_revision_problem(name, revision)
    return Need(key, f"{name}@{revision}", lambda: hub.is_cached(name, revision), problem)


def _remote_revision_problem(name: str, revision: str) -> str | None:
    """Ask the hub whether ``name`` has ``revision`` (a few hundred ms); None when it does or cannot tell."""
    from huggingface_hub import HfApi, errors

    try:
        HfApi().model_info(name, revision=revision, timeout=15)
    except errors.RevisionNotFoundError:
        return f"the hub has no revision {revision!r} of {name}"
    except errors.RepositoryNotFoundError:
        return f"{name} is not a model on the hub (or is private: set HF_TOKEN)"
    except Exception as e:  # noqa: BLE001 - anything else: let the download itself report it
        log.debug("cannot check %s@%s on the hub: %s", name, revision, e)
    return None


def _is_hub(name: str) -> bool:
    return name not in ("tiny", "small", "siglip") and not hub.is_local(name)


def _coco_needs(p) -> list[Need]:
    if p.coco.source != "coco2017":
        return []
    out, ddir = [], default_download_dir() / "coco2017"
    for name in remote.COCO_2017:
        if p.coco.local_dir:
            f = Path(p.coco.local_dir) / name
            out.append(Need("coco.local_dir", str(f), f.is_file, lambda f=f: f"{f} does not exist"))
        else:
            out.append(_url_need("coco.url" if p.coco.url else "coco.source", name, ddir / name,
                                 remote.coco_url(name, p.coco.url),
                                 f"put {name} in {ddir}, or set coco.local_dir to a folder holding the "
                                 "three archives, or coco.url to a mirror"))
    if p.coco.split == "karpathy":  # the split file
        if p.coco.split_path:
            f = Path(p.coco.split_path)
            out.append(Need("coco.split_path", str(f), f.is_file, lambda: f"{f} does not exist"))
        else:
            url, name = remote.karpathy_split(p.coco.split_url)
            dest = default_download_dir() / "karpathy" / name
            out.append(_url_need("coco.split_url" if p.coco.split_url else "coco.split", name, dest, url,
                                 f"put {name} in {dest.parent}, or set coco.split_path to a copy under "
                                 "inputs/data/, or coco.split_url to a mirror"))
    return out


def _cifar_needs(p) -> list[Need]:
    if p.cifar.source != "cifar10":
        return []
    if p.cifar.local_path:
        f = Path(p.cifar.local_path)
        return [Need("cifar.local_path", str(f), f.is_file, lambda: f"{f} does not exist")]
    dest = default_download_dir() / "cifar-10-python.tar.gz"
    return [_url_need("cifar.url" if p.cifar.url else "cifar.source", dest.name, dest,
                      p.cifar.url or remote.CIFAR_10[0],
                      f"put {dest.name} in {dest.parent}, or set cifar.local_path to a copy of it, "
                      "or cifar.url to a mirror")]


def _conversations_needs(p) -> list[Need]:
    c = p.conversations
    if c.source != "llava_instruct_150k" or c.path:
        return []
    dest = default_download_dir() / "llava-instruct-150k" / c.revision / remote.LLAVA_FILE
    return [_url_need("conversations.url" if c.url else "conversations.source", remote.LLAVA_FILE, dest,
                      c.url or remote.llava_url(c.revision),
                      f"put {remote.LLAVA_FILE} in {dest.parent}, or set conversations.path to a copy "
                      "under inputs/data/, or conversations.url to a mirror")]


def _siglip_needs(p) -> list[Need]:
    out = []
    if p.siglip.pretrained and p.siglip.backbone in remote.IMAGENET_WEIGHTS:
        import torch

        url = remote.IMAGENET_WEIGHTS[p.siglip.backbone]
        f = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name  # where torchvision caches it
        out.append(_url_need("siglip.pretrained", f.name, f, url,
                             f"put {f.name} in {f.parent} (or set TORCH_HOME), or set siglip.pretrained: false"))
    return out + _hub_needs(("siglip.text_encoder", p.siglip.text_encoder, p.siglip.text_encoder_revision))


def _hub_needs(*models: tuple[str, str, str]) -> list[Need]:
    """(key, name, revision) of each model a stage loads: a need where the name is a hub id."""
    return [_hub_need(key, name, revision) for key, name, revision in models if _is_hub(name)]


def _phi2(p) -> tuple[str, str, str]:
    return "phi2.base_model", p.phi2.base_model, p.phi2.revision


def _captioner_lm(p) -> tuple[str, str, str]:
    return "captioner.lm", p.captioner.lm, p.captioner.lm_revision


# What each stage fetches under the params: the stages of dvc.yaml that load something from the network
# (tests/test_sources.py holds the names to dvc.yaml). A frozen captioner LM is not saved with the
# captioner, so its evaluation loads it again; the QA model keeps only its adapter.
NEEDS: dict[str, Callable[..., list[Need]]] = {
    "download_coco": _coco_needs,
    "build_cifar_qa_csv": _cifar_needs,
    "build_conversations": _conversations_needs,
    "train_siglip": _siglip_needs,
    "precompute_embeddings": lambda p: _hub_needs(("captioner.vision_encoder", p.captioner.vision_encoder,
                                                   p.captioner.vision_encoder_revision)),
    "train_phi2_qlora": lambda p: _hub_needs(_phi2(p)),
    "evaluate_qa": lambda p: _hub_needs(_phi2(p)),
    "train_gpt2_captioner": lambda p: _hub_needs(_captioner_lm(p)),
    "evaluate_captioner": lambda p: _hub_needs(_captioner_lm(p)) if p.captioner.freeze_lm else [],
}


def stage_needs(stage: str, p) -> list[Need]:
    """The network things ``stage`` fetches under params ``p`` (a ``Params``)."""
    return NEEDS[stage](p) if stage in NEEDS else []


def _dag(dvc_yaml: Path) -> dict[str, tuple[list[str], list[str]]]:
    """stage -> (deps, outs) from dvc.yaml (an empty dict when there is none)."""
    try:
        stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        return {}

    def paths(items) -> list[str]:
        return [next(iter(i)) if isinstance(i, dict) else str(i) for i in (items or [])]
    return {name: (paths(s.get("deps")), paths(s.get("outs"))) for name, s in stages.items() if isinstance(s, dict)}


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def stages_to_check(stage: str, dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """``stage`` and every stage that is not upstream of it and has not produced all its outputs yet."""
    dag = _dag(dvc_yaml)
    if stage not in dag:
        return [stage]
    upstream: set[str] = set()
    todo = [stage]
    while todo:
        deps = dag[todo.pop()][0]
        for other, (_, outs) in dag.items():
            if other not in upstream and any(_under(d, o) for d in deps for o in outs):
                upstream.add(other)
                todo.append(other)
    root = dvc_yaml.parent
    pending = [s for s, (_, outs) in dag.items()
               if s != stage and s not in upstream and not all((root / o).exists() for o in outs)]
    return [stage, *pending]


def preflight(stage: str, p, dvc_yaml: Path = Path("dvc.yaml")) -> None:
    """Raise one ``UserError`` listing everything this and the pending stages need but cannot fetch."""
    problems, seen = [], set()
    for s in stages_to_check(stage, dvc_yaml):
        for need in stage_needs(s, p):
            if (need.key, need.what) in seen or need.present():
                continue
            seen.add((need.key, need.what))
            why = need.problem()
            if why:
                problems.append(f"{need.what} ({need.key}{'' if s == stage else f', for {s}'}): {why}")
    if problems:
        raise UserError(f"{stage}: cannot fetch what the params need: " + " | ".join(problems))
