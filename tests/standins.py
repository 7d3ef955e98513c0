"""Hub-shaped stand-ins: offline replicas of what the full preset downloads.

The full preset (``presets/full.yaml``) fetches three Hugging Face model repos
(``openai/clip-vit-base-patch16``, ``gpt2``, ``microsoft/phi-2``), torchvision's
ImageNet ResNet-50 weights, the three COCO 2017 archives and the CIFAR-10
python tarball. The builders here write look-alikes of all of them -- same file
names, directory layouts, configs and serialisation formats, random weights,
synthetic pixels -- so that a test can run that preset with ``HF_HUB_OFFLINE=1``
and no network at all:

- ``build_hub_cache``: a Hugging Face hub cache (what ``HF_HUB_CACHE`` points at);
- ``write_resnet50_weights``: the torch hub checkpoint cache (under ``TORCH_HOME``);
- ``coco2017_archives``: ``annotations_trainval2017.zip``, ``train2017.zip``, ``val2017.zip``;
- ``cifar10_tarball``: ``cifar-10-python.tar.gz`` with Python-2 pickles.

Everything is deterministic given ``seed``. Heavy imports (torch, transformers,
tokenizers, safetensors, torchvision) happen inside the functions.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = ["build_hub_cache", "write_resnet50_weights", "coco2017_archives", "cifar10_tarball"]

CLIP_REPO = "openai/clip-vit-base-patch16"
GPT2_REPO = "gpt2"
PHI2_REPO = "microsoft/phi-2"
HUB_REPOS = (CLIP_REPO, GPT2_REPO, PHI2_REPO)

# Real vocabulary sizes of the hub tokenizers. The stand-ins keep these ids
# (special tokens where the real ones are) and fill the id range between the
# trained BPE tokens and the special tokens with unreachable placeholders.
GPT2_EOS_ID = 50256              # "<|endoftext|>": last id of GPT-2's 50257-token vocab
CLIP_SOT_ID, CLIP_EOT_ID = 49406, 49407
BPE_VOCAB = 2000                 # trained part of each stand-in tokenizer (bytes + merges)
_FILLER = "<|standin_unused_{}|>"

# Files under blobs/ are named by their etag: the sha256 of the file for the
# LFS-tracked ones (weights), the git blob sha1 for the others.
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")


# ==================================================================================
# Hugging Face hub cache
# ==================================================================================

class _CacheRepo:
    """One ``models--{org}--{name}`` folder of a hub cache, pinned at ``commit``."""

    def __init__(self, cache_dir: Path, repo_id: str, commit: str, writer: Executor | None = None) -> None:
        if len(commit) != 40 or any(c not in "0123456789abcdef" for c in commit):
            raise ValueError(f"{repo_id}: revision must be a 40-hex commit hash, got {commit!r}")
        self.root = cache_dir / ("models--" + repo_id.replace("/", "--"))
        self.commit = commit
        self.blobs = self.root / "blobs"
        self.snapshot = self.root / "snapshots" / commit
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.snapshot.mkdir(parents=True, exist_ok=True)
        self.writer = writer
        self.pending: list[Future] = []

    def _link(self, filename: str, etag: str) -> None:
        link = self.snapshot / filename
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(self.blobs / etag, link.parent), link)

    def add_bytes(self, filename: str, data: bytes) -> None:
        if filename.endswith(_LFS_SUFFIXES):
            etag = hashlib.sha256(data).hexdigest()
        else:  # what `git hash-object` prints
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (self.blobs / etag).write_bytes(data)
        self._link(filename, etag)

    def add_json(self, filename: str, obj: Any) -> None:
        self.add_bytes(filename, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))

    def add_safetensors(self, filename: str, tensors: Mapping[str, Any]) -> None:
        """Write ``tensors`` as an LFS blob, on the ``writer`` thread if there is one (writing and
        hashing release the GIL, so the next model's random init runs meanwhile)."""
        if self.writer is None:
            self._save_safetensors(filename, dict(tensors))
        else:
            self.pending.append(self.writer.submit(self._save_safetensors, filename, dict(tensors)))

    def _save_safetensors(self, filename: str, tensors: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        tmp = self.blobs / f".incomplete.{filename}"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        with open(tmp, "rb") as f:
            etag = hashlib.file_digest(f, "sha256").hexdigest()
        os.replace(tmp, self.blobs / etag)
        self._link(filename, etag)

    def finish(self) -> Path:
        for f in self.pending:
            f.result()
        refs = self.root / "refs"
        refs.mkdir(exist_ok=True)
        (refs / "main").write_text(self.commit)  # no trailing newline, like huggingface_hub
        return self.snapshot


# --- tokenizers --------------------------------------------------------------------

def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table, in GPT-2's id order (ids 0..255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable]
    extra = 0
    for b in range(256):
        if b not in printable:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _clip_split_regex() -> str:
    return r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _bpe_merges(texts: Sequence[str], vocab_size: int = BPE_VOCAB, *, clip: bool = False) -> list[tuple[str, str]]:
    """Merges of a byte-level BPE trained on ``texts`` (GPT-2 style, or CLIP style with ``</w>``)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    suffix = {"end_of_word_suffix": "</w>"} if clip else {}
    tok = Tokenizer(models.BPE(**suffix))
    if clip:
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_clip_split_regex()), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **suffix)
    tok.train_from_iterator(list(texts), trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def _padded_vocab(base: list[str], merges: list[tuple[str, str]], first_special: int) -> dict[str, int]:
    """``base`` symbols, then merge results in merge order, then placeholders up to ``first_special``."""
    vocab: dict[str, int] = {}
    for s in base:
        vocab.setdefault(s, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    if len(vocab) > first_special:
        raise ValueError(f"trained vocab ({len(vocab)}) does not fit below id {first_special}")
    i = 0
    while len(vocab) < first_special:
        name = _FILLER.format(i)
        if name not in vocab:
            vocab[name] = len(vocab)
        i += 1
    return vocab


def _merges_txt(merges: list[tuple[str, str]]) -> bytes:
    return ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode("utf-8")


def _vocab_json(vocab: Mapping[str, int]) -> bytes:
    return json.dumps(dict(vocab), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _added(content: str, *, special: bool, normalized: bool) -> dict:
    return {"content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": normalized, "special": special}


def _gpt2_tokenizer_json(vocab: dict[str, int], merges: list[tuple[str, str]],
                         added: list[tuple[int, str, bool]]) -> bytes:
    """``tokenizer.json`` of GPT-2 / Phi-2 (byte-level BPE, no normalizer); ``added``: (id, content, special)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    for want, content, special in added:
        t = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=not special, special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([t])
        got = tok.token_to_id(content)
        if got != want:
            raise AssertionError(f"added token {content!r} got id {got}, expected {want}")
    return tok.to_str().encode("utf-8")


def _clip_tokenizer_json(vocab: dict[str, int], merges: list[tuple[str, str]]) -> bytes:
    """``tokenizer.json`` of CLIP (lower-casing, ``</w>`` word ends, <|startoftext|> ... <|endoftext|>)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="</w>", fuse_unk=False, unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_clip_split_regex()), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.post_processor = processors.RobertaProcessing(("<|endoftext|>", CLIP_EOT_ID), ("<|startoftext|>", CLIP_SOT_ID),
                                                      trim_offsets=False, add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=True, special=True) for t in ("<|startoftext|>", "<|endoftext|>")])
    return tok.to_str().encode("utf-8")


def _special(content: str) -> dict:
    return {"content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True,
            "__type": "AddedToken"}


def _write_clip_tokenizer(repo: _CacheRepo, texts: Sequence[str]) -> None:
    merges = _bpe_merges(texts, BPE_VOCAB, clip=True)
    alphabet = _byte_alphabet()
    vocab = _padded_vocab(alphabet + [c + "</w>" for c in alphabet], merges, CLIP_SOT_ID)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = CLIP_SOT_ID, CLIP_EOT_ID
    repo.add_bytes("vocab.json", _vocab_json(vocab))
    repo.add_bytes("merges.txt", _merges_txt(merges))
    repo.add_bytes("tokenizer.json", _clip_tokenizer_json(vocab, merges))
    repo.add_json("tokenizer_config.json", {
        "add_prefix_space": False,
        "bos_token": _special("<|startoftext|>"),
        "do_lower_case": True,
        "eos_token": _special("<|endoftext|>"),
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": _special("<|endoftext|>"),
    })
    repo.add_json("special_tokens_map.json", {
        "bos_token": {k: v for k, v in _special("<|startoftext|>").items() if k != "__type"},
        "eos_token": {k: v for k, v in _special("<|endoftext|>").items() if k != "__type"},
        "pad_token": "<|endoftext|>",
        "unk_token": {k: v for k, v in _special("<|endoftext|>").items() if k != "__type"},
    })


# Phi-2 (CodeGen) adds runs of 31..2 spaces, then 9..2 tabs, after GPT-2's 50257 tokens.
_PHI2_ADDED = [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]


def _write_gpt2_style_tokenizers(gpt2: _CacheRepo, phi2: _CacheRepo, texts: Sequence[str]) -> None:
    merges = _bpe_merges(texts, BPE_VOCAB)
    vocab = _padded_vocab(_byte_alphabet(), merges, GPT2_EOS_ID)
    vocab["<|endoftext|>"] = GPT2_EOS_ID
    vocab_json, merges_txt = _vocab_json(vocab), _merges_txt(merges)
    eos = [(GPT2_EOS_ID, "<|endoftext|>", True)]

    # gpt2: the hub repo has no special_tokens_map.json; its tokenizer_config.json is this one line.
    gpt2.add_bytes("vocab.json", vocab_json)
    gpt2.add_bytes("merges.txt", merges_txt)
    gpt2.add_bytes("tokenizer.json", _gpt2_tokenizer_json(vocab, merges, eos))
    gpt2.add_json("tokenizer_config.json", {"model_max_length": 1024})

    added = [(GPT2_EOS_ID + 1 + i, s, False) for i, s in enumerate(_PHI2_ADDED)]
    phi2.add_bytes("vocab.json", vocab_json)
    phi2.add_bytes("merges.txt", merges_txt)
    phi2.add_bytes("tokenizer.json", _gpt2_tokenizer_json(vocab, merges, eos + added))
    phi2.add_json("added_tokens.json", {s: i for i, s, _ in sorted(added, reverse=True)})
    decoder = {str(GPT2_EOS_ID): _added("<|endoftext|>", special=True, normalized=False)}
    decoder.update({str(i): _added(s, special=False, normalized=True) for i, s, _ in added})
    phi2.add_json("tokenizer_config.json", {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": True,
        "eos_token": "<|endoftext|>",
        "model_max_length": 2048,
        "tokenizer_class": "CodeGenTokenizer",
        "unk_token": "<|endoftext|>",
    })
    phi2.add_json("special_tokens_map.json", {
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"})


# --- configs (the keys of the real config.json files) ------------------------------------

def clip_config() -> dict:
    """``config.json`` of openai/clip-vit-base-patch16 (model-relevant keys)."""
    text = {
        "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu",
        "hidden_size": 512, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 2048,
        "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
        "num_attention_heads": 8, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 512,
        "vocab_size": 49408,
    }
    vision = {
        "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 768, "image_size": 224,
        "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
        "model_type": "clip_vision_model", "num_attention_heads": 12, "num_channels": 3, "num_hidden_layers": 12,
        "patch_size": 16, "projection_dim": 512,
    }
    return {
        "_name_or_path": CLIP_REPO,
        "architectures": ["CLIPModel"],
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "model_type": "clip",
        "projection_dim": 512,
        "text_config": text,
        "text_config_dict": {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
                             "num_hidden_layers": 12, "projection_dim": 512},
        "torch_dtype": "float32",
        "vision_config": vision,
        "vision_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                               "num_hidden_layers": 12, "patch_size": 16, "projection_dim": 512},
    }


def clip_preprocessor_config() -> dict:
    """``preprocessor_config.json`` of CLIP (the OpenAI resize/crop/normalise settings)."""
    return {
        "crop_size": {"height": 224, "width": 224},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": 224},
    }


def gpt2_config(n_layer: int = 12) -> dict:
    """``config.json`` of gpt2 (124M), with ``n_layer`` blocks (12 in the real model)."""
    return {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1,
        "bos_token_id": GPT2_EOS_ID,
        "embd_pdrop": 0.1,
        "eos_token_id": GPT2_EOS_ID,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "n_ctx": 1024,
        "n_embd": 768,
        "n_head": 12,
        "n_layer": n_layer,
        "n_positions": 1024,
        "resid_pdrop": 0.1,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "vocab_size": 50257,
    }


def phi2_config(num_hidden_layers: int = 32) -> dict:
    """``config.json`` of microsoft/phi-2 (32 layers there)."""
    return {
        "_name_or_path": PHI2_REPO,
        "architectures": ["PhiForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": GPT2_EOS_ID,
        "embd_pdrop": 0.0,
        "eos_token_id": GPT2_EOS_ID,
        "hidden_act": "gelu_new",
        "hidden_size": 2560,
        "initializer_range": 0.02,
        "intermediate_size": 10240,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 2048,
        "model_type": "phi",
        "num_attention_heads": 32,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": 32,
        "partial_rotary_factor": 0.4,
        "qk_layernorm": False,
        "resid_pdrop": 0.1,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.37.0",
        "use_cache": True,
        "vocab_size": 51200,
    }


def _generation_config(version: str) -> dict:
    return {"_from_model_config": True, "bos_token_id": GPT2_EOS_ID, "eos_token_id": GPT2_EOS_ID,
            "transformers_version": version}


# --- models ----------------------------------------------------------------------

_TORCH_INIT_FUNCTIONS = ("uniform_", "normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
                         "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "trunc_normal_", "orthogonal_",
                         "sparse_")


@contextlib.contextmanager
def _skip_torch_default_init():
    """Make ``torch.nn.init`` functions no-ops, so that building a model runs only
    transformers' ``_init_weights`` (which calls saved references to the real
    functions and covers every parameter), not also the nn.Linear/Embedding
    defaults that it then overwrites: a third of the build time otherwise."""
    import torch

    def skip(tensor, *args, **kwargs):
        return tensor

    saved = {n: getattr(torch.nn.init, n) for n in _TORCH_INIT_FUNCTIONS if hasattr(torch.nn.init, n)}
    try:
        for n in saved:
            setattr(torch.nn.init, n, skip)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def _random_model(model_cls, config_cls, config: dict, seed: int, save_dtype):
    """``model_cls`` with transformers' random init, drawn in float16 (CPU normal
    sampling is ~3x faster there than in float32), then cast to ``save_dtype``."""
    import torch

    torch.manual_seed(seed)
    with _skip_torch_default_init():
        model = model_cls._from_config(config_cls.from_dict(config), dtype=torch.float16)
    return model.to(save_dtype)


def _write_clip(repo: _CacheRepo, seed: int, texts: Sequence[str]) -> None:
    import torch
    from transformers import CLIPConfig, CLIPModel

    cfg = clip_config()
    model = _random_model(CLIPModel, CLIPConfig, cfg, seed, torch.float32)
    with torch.no_grad():  # exactly the configured value (float16 rounds it)
        model.logit_scale.fill_(cfg["logit_scale_init_value"])
    repo.add_json("config.json", cfg)
    repo.add_safetensors("model.safetensors", model.state_dict())
    del model
    repo.add_json("preprocessor_config.json", clip_preprocessor_config())
    _write_clip_tokenizer(repo, texts)


def _write_gpt2(repo: _CacheRepo, seed: int, layers: int) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    model = _random_model(GPT2LMHeadModel, GPT2Config, gpt2_config(layers), seed, torch.float32)
    # The hub checkpoint is a GPT2Model's: keys without "transformer.", no (tied) lm_head.
    state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    repo.add_json("config.json", gpt2_config(layers))
    repo.add_json("generation_config.json", _generation_config("4.26.0.dev0"))
    repo.add_safetensors("model.safetensors", state)


def _write_phi2(repo: _CacheRepo, seed: int, layers: int) -> None:
    import torch
    from transformers import PhiConfig, PhiForCausalLM

    cfg = phi2_config(layers)
    model = _random_model(PhiForCausalLM, PhiConfig, cfg, seed, torch.float16)
    state = model.state_dict()
    del model
    first = (layers + 1) // 2  # layers 0..first-1 (and the embedding) go in shard 1

    def shard_of(key: str) -> int:
        if key.startswith("model.embed_tokens."):
            return 1
        if key.startswith("model.layers."):
            return 1 if int(key.split(".")[2]) < first else 2
        return 2

    names = {1: "model-00001-of-00002.safetensors", 2: "model-00002-of-00002.safetensors"}
    weight_map = {k: names[shard_of(k)] for k in sorted(state)}
    for i, name in names.items():
        repo.add_safetensors(name, {k: v for k, v in state.items() if shard_of(k) == i})
    total = sum(v.numel() * v.element_size() for v in state.values())
    repo.add_json("model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    repo.add_json("config.json", cfg)
    repo.add_json("generation_config.json", _generation_config("4.37.0"))


def cache_folder(cache_dir: Path, repo_id: str, commit: str, folder: Path) -> Path:
    """Put the files of a ``save_pretrained`` folder into a hub cache as ``repo_id`` at ``commit``
    (blobs, ``snapshots/<commit>`` links, ``refs/main``), as a download would have; returns the snapshot.
    For small models built in a test; ``build_hub_cache`` makes the real architectures."""
    repo = _CacheRepo(Path(cache_dir), repo_id, commit)
    for f in sorted(Path(folder).rglob("*")):
        if f.is_file():
            repo.add_bytes(str(f.relative_to(folder)), f.read_bytes())
    return repo.finish()


def build_hub_cache(cache_dir: Path, revisions: Mapping[str, str], texts: Sequence[str], *,
                    phi2_layers: int = 2, gpt2_layers: int = 12, seed: int = 0) -> dict[str, Path]:
    """Write a Hugging Face hub cache (the folder ``HF_HUB_CACHE`` names) holding
    stand-ins of ``openai/clip-vit-base-patch16``, ``gpt2`` and ``microsoft/phi-2``.

    Layout as huggingface_hub writes it: ``models--{org}--{name}/blobs/<etag>``,
    ``refs/main`` (the commit, no newline) and ``snapshots/<commit>/<file>``
    relative symlinks into ``blobs``; ``revisions`` gives each repo's commit.
    Each repo has the real config files and architecture (random weights):

    - CLIP ViT-B/16 (``CLIPModel``, float32 ``model.safetensors``), the real
      ``preprocessor_config.json`` settings and a CLIP-style tokenizer;
    - GPT-2 124M (float32 ``model.safetensors`` with the hub's ``GPT2Model`` key
      names, weights tied to the LM head), with ``gpt2_layers`` blocks (12 in the
      real model, the default);
    - Phi-2 in float16, in two shards with ``model.safetensors.index.json``.
      ``num_hidden_layers`` is ``phi2_layers`` (32 in the real model), to keep
      the cache small.

    The layer counts are the only deviations from the real configs: widths,
    vocabularies, positions and file layouts are the hub's.

    Tokenizers are byte-level BPEs trained on ``texts`` (up to ~2000 tokens:
    the 256 bytes and merges; training stops sooner once every word of
    ``texts`` is one token), padded with unreachable placeholders so that the special
    tokens keep their real ids and counts: GPT-2 ``<|endoftext|>`` = 50256 of
    50257, Phi-2 the same plus its 38 whitespace tokens (50295 < 51200 rows),
    CLIP ``<|startoftext|>``/``<|endoftext|>`` = 49406/49407 of 49408.
    Returns repo id -> snapshot folder.
    """
    cache_dir = Path(cache_dir)
    missing = [r for r in HUB_REPOS if r not in revisions]
    if missing:
        raise ValueError(f"revisions: no commit for {', '.join(missing)}")
    if phi2_layers < 1 or gpt2_layers < 1:
        raise ValueError("phi2_layers and gpt2_layers must be >= 1")
    texts = list(texts)
    if not texts:
        raise ValueError("texts: need some text to train the tokenizers on")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="standins-writer") as writer:
        repos = {r: _CacheRepo(cache_dir, r, revisions[r], writer) for r in HUB_REPOS}
        _write_gpt2_style_tokenizers(repos[GPT2_REPO], repos[PHI2_REPO], texts)
        _write_clip(repos[CLIP_REPO], seed, texts)
        _write_gpt2(repos[GPT2_REPO], seed, gpt2_layers)
        _write_phi2(repos[PHI2_REPO], seed, phi2_layers)
        return {r: repo.finish() for r, repo in repos.items()}


# ==================================================================================
# torchvision ImageNet ResNet-50
# ==================================================================================

def write_resnet50_weights(torch_home: Path, seed: int = 0) -> Path:
    """Imitates torchvision's download of ``ResNet50_Weights.DEFAULT``: a random-init
    ``resnet50()`` state dict saved with ``torch.save`` at
    ``<torch_home>/hub/checkpoints/<basename of the weights URL>``, where
    ``resnet50(weights="DEFAULT")`` finds it with ``TORCH_HOME=<torch_home>``."""
    import torch
    from torchvision.models import ResNet50_Weights, resnet50

    path = Path(torch_home) / "hub" / "checkpoints" / os.path.basename(ResNet50_Weights.DEFAULT.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = resnet50()
    tmp = path.with_name(path.name + ".partial")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return path


# ==================================================================================
# COCO 2017
# ==================================================================================

_ZIP_TIME = (2017, 9, 1, 12, 0, 0)
_COCO_INFO = {"description": "COCO 2017 Dataset", "url": "http://cocodataset.org", "version": "1.0",
              "year": 2017, "contributor": "COCO Consortium", "date_created": "2017/09/01"}
_COCO_LICENSES = [
    {"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "Attribution-NonCommercial-ShareAlike License"},
    {"url": "http://creativecommons.org/licenses/by-nc/2.0/", "id": 2, "name": "Attribution-NonCommercial License"},
    {"url": "http://creativecommons.org/licenses/by-nc-nd/2.0/", "id": 3, "name": "Attribution-NonCommercial-NoDerivs License"},
    {"url": "http://creativecommons.org/licenses/by/2.0/", "id": 4, "name": "Attribution License"},
    {"url": "http://creativecommons.org/licenses/by-sa/2.0/", "id": 5, "name": "Attribution-ShareAlike License"},
    {"url": "http://creativecommons.org/licenses/by-nd/2.0/", "id": 6, "name": "Attribution-NoDerivs License"},
    {"url": "http://flickr.com/commons/usage/", "id": 7, "name": "No known copyright restrictions"},
    {"url": "http://www.usa.gov/copyright.shtml", "id": 8, "name": "United States Government Work"},
]
_COCO_CATEGORIES = [
    {"supercategory": "person", "id": 1, "name": "person"},
    {"supercategory": "vehicle", "id": 2, "name": "bicycle"},
    {"supercategory": "vehicle", "id": 3, "name": "car"},
]
# Caption quirks of the real files, each forced at least once per split.
CAPTION_QUIRKS = ("leading_space", "trailing_space", "trailing_newline", "double_space", "no_period")


def _styled_caption(text: str, quirk: str | None) -> str:
    """Most real captions: "A cat on a mat." -- capitalised, full stop -- plus ``quirk``."""
    if quirk == "no_period":
        return text
    s = text[0].upper() + text[1:] + "."
    if quirk == "leading_space":
        return " " + s
    if quirk == "trailing_space":
        return s + " "
    if quirk == "trailing_newline":
        return s + "\n"
    if quirk == "double_space":
        return s.replace(" ", "  ", 1) if " " in s else s + "  "
    return s


def _zip_entry(zf: zipfile.ZipFile, name: str, data: bytes, compress: int) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    info.compress_type = compress
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def _zip_dir(zf: zipfile.ZipFile, name: str) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    info.external_attr = (0o40755 << 16) | 0x10
    zf.writestr(info, b"")


def coco2017_archives(out_dir: Path, n_train: int, n_val: int, *, seed: int = 0,
                      image_size: tuple[int, int] = (160, 120)) -> dict[str, Path]:
    """The three COCO 2017 downloads in their official layouts, from the shapes world.

    ``annotations_trainval2017.zip`` (``annotations/captions_{train,val}2017.json``
    in the real schema, and a stub ``annotations/instances_val2017.json``),
    ``train2017.zip`` and ``val2017.zip`` (a ``train2017/`` folder entry, then
    ``train2017/<12-digit id>.jpg``; sparse ids). Images are JPEGs of
    ``vlmpipe.sources.shapes`` scenes at ``image_size`` (width, height) -- or
    portrait, or a shorter crop, like COCO's mixed sizes -- and about one in
    ten of each split (at least one) is greyscale. Captions are the scene's
    true captions, 5 per image (6 or 7 for about one in eight), styled like
    COCO's ("A red circle ... ."), with its quirks: leading/trailing spaces, a
    trailing newline, a double space, no full stop. Returns name -> path.
    """
    from PIL import Image

    from vlmpipe.sources import shapes

    if n_train < 1 or n_val < 1:
        raise ValueError("coco2017_archives: n_train and n_val must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    width, height = image_size
    rng = np.random.default_rng([seed, 2017, 1])
    ids = rng.choice(np.arange(1, 582_000), size=n_train + n_val, replace=False)
    split_ids = {"train": [int(i) for i in ids[:n_train]], "val": [int(i) for i in ids[n_train:]]}
    ann_ids = iter(int(i) for i in rng.choice(np.arange(1, 830_000), size=7 * (n_train + n_val), replace=False))
    captions: dict[str, dict] = {}
    paths: dict[str, Path] = {}
    for split, n in (("train", n_train), ("val", n_val)):
        grey_slot = min(3, n - 1)
        images, annotations = [], []
        path = out_dir / f"{split}2017.zip"
        with zipfile.ZipFile(path, "w") as zf:
            _zip_dir(zf, f"{split}2017/")
            for k, image_id in enumerate(sorted(split_ids[split])):
                r = np.random.default_rng([seed, 2017, image_id])
                w, h = [(width, height), (height, width), (width, round(height * 0.89))][
                    int(r.choice(3, p=[0.7, 0.2, 0.1]))]
                scene = shapes.random_scene(r, max(w, h))
                img = Image.fromarray(scene.image)
                if (w, h) != img.size:
                    img = img.resize((w, h), Image.Resampling.BICUBIC)
                if k % 10 == grey_slot:
                    img = img.convert("L")
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                file_name = f"{image_id:012d}.jpg"
                _zip_entry(zf, f"{split}2017/{file_name}", buf.getvalue(), zipfile.ZIP_STORED)
                captured = np.datetime64("2013-01-01T00:00:00") + np.timedelta64(int(r.integers(0, 3 * 365 * 86400)), "s")
                images.append({
                    "license": int(r.integers(1, 9)),
                    "file_name": file_name,
                    "coco_url": f"http://images.cocodataset.org/{split}2017/{file_name}",
                    "height": h,
                    "width": w,
                    "date_captured": str(captured).replace("T", " "),
                    "flickr_url": f"http://farm{int(r.integers(1, 10))}.staticflickr.com/{int(r.integers(1000, 9999))}/"
                                  f"{int(r.integers(10**9, 10**10))}_{r.bytes(5).hex()[:10]}_z.jpg",
                    "id": image_id,
                })
                n_caps = int(r.choice([5, 6, 7], p=[0.875, 0.1, 0.025]))
                for text in shapes.scene_captions(scene, r, n_caps):
                    j = len(annotations)
                    if j < len(CAPTION_QUIRKS):
                        quirk = CAPTION_QUIRKS[j]
                    else:
                        quirk = str(r.choice([*CAPTION_QUIRKS, "none"], p=[0.03, 0.05, 0.02, 0.02, 0.08, 0.8]))
                    annotations.append({"image_id": image_id, "id": next(ann_ids),
                                        "caption": _styled_caption(text, None if quirk == "none" else quirk)})
        paths[path.name] = path
        # The real files list images and captions in no particular order.
        images = [images[i] for i in rng.permutation(len(images))]
        annotations = [annotations[i] for i in rng.permutation(len(annotations))]
        captions[split] = {"info": _COCO_INFO, "licenses": _COCO_LICENSES, "images": images, "annotations": annotations}
    ann_path = out_dir / "annotations_trainval2017.zip"
    with zipfile.ZipFile(ann_path, "w") as zf:
        instances = {**captions["val"], "annotations": [], "categories": _COCO_CATEGORIES}
        for member, obj in (("annotations/instances_val2017.json", instances),
                            ("annotations/captions_train2017.json", captions["train"]),
                            ("annotations/captions_val2017.json", captions["val"])):
            _zip_entry(zf, member, json.dumps(obj, separators=(",", ":")).encode("utf-8"), zipfile.ZIP_DEFLATED)
    paths[ann_path.name] = ann_path
    return {name: paths[name] for name in ("annotations_trainval2017.zip", "train2017.zip", "val2017.zip")}


# ==================================================================================
# CIFAR-10
# ==================================================================================

CIFAR10_LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class _Py2Pickler:
    """A protocol-2 pickle writer that emits what Python 2's cPickle wrote for
    the CIFAR batches: str and bytes alike as Python 2 str ((SHORT_)BINSTRING), numpy arrays through
    ``numpy.core.multiarray._reconstruct``, memo puts after every string,
    container and reduced object, APPENDS/SETITEMS in runs of 1000."""

    BATCH = 1000

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.memo = 0

    def dump(self, obj: Any) -> None:
        self.f.write(pickle.PROTO + b"\x02")
        self.save(obj)
        self.f.write(pickle.STOP)

    def put(self) -> None:
        self.memo += 1
        self.f.write(pickle.BINPUT + bytes([self.memo]) if self.memo < 256
                     else pickle.LONG_BINPUT + struct.pack("<I", self.memo))

    def save(self, obj: Any) -> None:
        w = self.f.write
        if obj is None:
            w(pickle.NONE)
        elif obj is True or obj is False:
            w(pickle.NEWTRUE if obj else pickle.NEWFALSE)
        elif isinstance(obj, (int, np.integer)):
            self.save_int(int(obj))
        elif isinstance(obj, (bytes, str)):
            self.save_str(obj.encode("latin-1") if isinstance(obj, str) else bytes(obj))
        elif isinstance(obj, tuple):
            self.save_tuple(obj)
        elif isinstance(obj, list):
            w(pickle.EMPTY_LIST)
            self.put()
            self.batched(obj, pickle.APPEND, pickle.APPENDS)
        elif isinstance(obj, dict):
            w(pickle.EMPTY_DICT)
            self.put()
            self.batched(list(obj.items()), pickle.SETITEM, pickle.SETITEMS)
        elif isinstance(obj, np.ndarray):
            self.save_array(obj)
        elif isinstance(obj, np.dtype):
            self.save_dtype(obj)
        else:
            raise TypeError(f"cannot write {type(obj).__name__} as a Python 2 pickle")

    def save_int(self, v: int) -> None:
        if 0 <= v < 256:
            self.f.write(pickle.BININT1 + bytes([v]))
        elif 0 <= v < 65536:
            self.f.write(pickle.BININT2 + struct.pack("<H", v))
        elif -2**31 <= v < 2**31:
            self.f.write(pickle.BININT + struct.pack("<i", v))
        else:
            raise ValueError(f"integer {v} needs LONG1, not used in CIFAR batches")

    def save_str(self, b: bytes) -> None:
        if len(b) < 256:
            self.f.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b)
        else:
            self.f.write(pickle.BINSTRING + struct.pack("<i", len(b)))
            self.f.write(b)
        self.put()

    def save_tuple(self, t: tuple) -> None:
        if not t:
            self.f.write(pickle.EMPTY_TUPLE)
            return
        if len(t) > 3:
            self.f.write(pickle.MARK)
        for x in t:
            self.save(x)
        self.f.write({1: pickle.TUPLE1, 2: pickle.TUPLE2, 3: pickle.TUPLE3}.get(len(t), pickle.TUPLE))
        self.put()

    def batched(self, items: list, one: bytes, many: bytes) -> None:
        pairs = one == pickle.SETITEM
        for start in range(0, len(items), self.BATCH):
            chunk = items[start:start + self.BATCH]
            if len(chunk) > 1:
                self.f.write(pickle.MARK)
            for x in chunk:
                if pairs:
                    self.save(x[0])
                    self.save(x[1])
                else:
                    self.save(x)
            self.f.write(many if len(chunk) > 1 else one)

    def save_global(self, module: str, name: str) -> None:
        self.f.write(pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii"))
        self.put()

    def save_dtype(self, dt: np.dtype) -> None:
        # numpy 1.x: dtype.__reduce__() == (dtype, ('u1', 0, 1), (3, '|', None, None, None, -1, -1, 0))
        if dt.fields is not None or dt.subdtype is not None or dt.kind not in "biuf":
            raise TypeError(f"only plain numeric dtypes, not {dt}")
        self.save_global("numpy", "dtype")
        self.save_tuple((f"{dt.kind}{dt.itemsize}", 0, 1))
        self.f.write(pickle.REDUCE)
        self.put()
        order = "|" if dt.itemsize == 1 else ("<" if dt.byteorder in "=<" else ">")
        self.save_tuple((3, order, None, None, None, -1, -1, 0))
        self.f.write(pickle.BUILD)

    def save_array(self, a: np.ndarray) -> None:
        # numpy 1.x: ndarray.__reduce__() ==
        #   (numpy.core.multiarray._reconstruct, (ndarray, (0,), 'b'), (1, shape, dtype, is_fortran, raw bytes))
        a = np.ascontiguousarray(a)
        self.save_global("numpy.core.multiarray", "_reconstruct")
        self.save_global("numpy", "ndarray")
        self.save_tuple((0,))
        self.save_str(b"b")
        self.f.write(pickle.TUPLE3)
        self.put()
        self.f.write(pickle.REDUCE)
        self.put()
        w = self.f.write
        w(pickle.MARK)
        self.save_int(1)
        self.save_tuple(tuple(int(s) for s in a.shape))
        self.save_dtype(a.dtype)
        w(pickle.NEWFALSE)
        if a.nbytes < 256:
            self.save_str(a.tobytes())
        else:  # the pixels: written straight from the array, no copy
            self.f.write(pickle.BINSTRING + struct.pack("<i", a.nbytes))
            self.f.write(memoryview(a).cast("B"))
            self.put()
        w(pickle.TUPLE)
        self.put()
        w(pickle.BUILD)


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes | None, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = mtime
    info.uid = info.gid = 1000
    info.uname = info.gname = "kriz"
    if data is None:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tf.addfile(info)
    else:
        info.mode = 0o644
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))


_CIFAR_README = b"""<meta HTTP-EQUIV="REFRESH" content="0; url=http://www.cs.toronto.edu/~kriz/cifar.html">
"""


def cifar10_tarball(out_dir: Path, train_per_class: int, test_per_class: int, *, seed: int = 0) -> Path:
    """``cifar-10-python.tar.gz`` in the official layout: ``cifar-10-batches-py/``
    with ``data_batch_1``..``5``, ``test_batch``, ``batches.meta`` and
    ``readme.html``. The batches are Python 2 (protocol 2) pickles like the
    official ones -- str keys/values as BINSTRING, arrays via
    ``numpy.core.multiarray._reconstruct`` -- holding
    ``vlmpipe.data.cifar.synthetic_split`` shape images under the real ten
    CIFAR-10 label names."""
    from vlmpipe.sources import cifar

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[tuple[str, bytes]] = []

    def batch(obj: dict) -> bytes:
        buf = io.BytesIO()
        _Py2Pickler(buf).dump(obj)
        return buf.getvalue()

    images, labels, names = cifar.synthetic_split(seed, "train", train_per_class)
    chunks = np.array_split(np.arange(len(labels)), 5)
    for i, idx in enumerate(chunks, start=1):
        files.append((f"data_batch_{i}", batch({
            "data": cifar.to_rows(images[idx]),
            "labels": [int(labels[j]) for j in idx],
            "batch_label": f"training batch {i} of 5",
            "filenames": [names[j] for j in idx],
        })))
    images, labels, names = cifar.synthetic_split(seed, "test", test_per_class)
    files.append(("test_batch", batch({
        "data": cifar.to_rows(images),
        "labels": [int(x) for x in labels],
        "batch_label": "testing batch 1 of 1",
        "filenames": list(names),
    })))
    files.append(("batches.meta", batch({
        "num_cases_per_batch": len(chunks[0]),
        "label_names": list(CIFAR10_LABEL_NAMES),
        "num_vis": 3072,
    })))
    files.append(("readme.html", _CIFAR_README))

    path = out_dir / "cifar-10-python.tar.gz"
    tmp = path.with_name(path.name + ".partial")
    mtime = 1244678400  # June 2009, when the official archive was made
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=mtime) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tf:
        _tar_add(tf, "cifar-10-batches-py/", None, mtime)
        for name, data in files:
            _tar_add(tf, f"cifar-10-batches-py/{name}", data, mtime)
    os.replace(tmp, path)
    return path


def llava_instruct_json(annotations_zip: Path, out: Path, absent: int = 1) -> Path:
    """A small ``llava_instruct_150k.json``: LLaVA-Instruct conversations (the real record layout, the
    ``<image>`` marker before or after the first question, 1-3 turns with free-form answers) about every
    train2017 image of ``annotations_zip``, plus ``absent`` about images COCO does not have."""
    with zipfile.ZipFile(annotations_zip) as zf:
        data = json.loads(zf.read("annotations/captions_train2017.json"))
    caps: dict[int, list[str]] = {}
    for a in data["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"].strip())
    questions = ["What do you see happening in this image?", "What colors are the shapes?",
                 "Is there anything unusual about this image?", "How many objects can you see?"]
    records = []
    ids = sorted(caps) + [999_999_000 + k for k in range(absent)]
    for n, iid in enumerate(ids):
        first, refs = questions[n % len(questions)], caps.get(iid) or ["a cat on a sofa"]
        conv = [{"from": "human", "value": f"<image>\n{first}" if n % 3 else f"{first}\n<image>"},
                {"from": "gpt", "value": "The image shows " + refs[0].lower().rstrip(".")
                 + ". The shapes are drawn on a plain background, and nothing else is in the picture."}]
        for t in range(n % 3):
            conv += [{"from": "human", "value": questions[(n + t + 1) % len(questions)]},
                     {"from": "gpt", "value": f"Looking closely, {refs[(t + 1) % len(refs)].lower()}"}]
        records.append({"id": f"{iid:012d}", "image": f"{iid:012d}.jpg", "conversations": conv})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1))
    return out
