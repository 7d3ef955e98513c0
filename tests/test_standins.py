"""The hub-shaped stand-ins (tests/standins.py) load with the real consumers.

Each builder imitates a download of the full preset; these tests load its
output the way the consumers do: transformers / huggingface_hub with
``HF_HUB_OFFLINE=1`` (Phi-2 in 4-bit through bitsandbytes), torchvision with
``TORCH_HOME``, the project's COCO and CIFAR readers, pycocotools, and a
torchvision-style CIFAR unpickling. Loads that read environment variables at
import time run in a fresh subprocess, with sockets disabled there so that
any attempt to reach the network fails loudly.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import pickletools
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import standins

REPO_ROOT = Path(__file__).resolve().parents[1]

# The commits presets/full.yaml pins.
REVISIONS = {
    "openai/clip-vit-base-patch16": "57c216476eefef5ab752ec549e440a49ae4ae5f3",
    "gpt2": "607a30d783dfa663caf39e06633721c8d4cfcd7e",
    "microsoft/phi-2": "ef382358ec9e382308935a992d908de099b64c23",
}

# Prepended to every subprocess script: any socket use raises.
NO_NETWORK = textwrap.dedent("""
    import socket

    def _refuse(*args, **kwargs):
        raise OSError("stand-in test: network access attempted")

    socket.socket.connect = socket.socket.connect_ex = _refuse
    socket.create_connection = socket.getaddrinfo = _refuse
""")


def run_python(script: str, env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``script`` (after NO_NETWORK) with ``args`` in a fresh interpreter whose environment has
    no HF_*/TORCH_HOME of ours, plus ``env``; fail with its output if it fails."""
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH_HOME"))}
    full_env.update({"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                     "PYTHONWARNINGS": "ignore", **env})
    p = subprocess.run([sys.executable, "-c", NO_NETWORK + textwrap.dedent(script), *args], env=full_env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"subprocess failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def sample_texts(n_scenes: int = 200, seed: int = 0) -> list[str]:
    """Captions of the shapes world plus question/answer lines: what the pipeline's LMs read."""
    from vlmpipe.sources import shapes

    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n_scenes):
        scene = shapes.random_scene(rng, 64)
        texts += shapes.scene_captions(scene, rng, 5)
    for kind in shapes.SHAPES:
        for colour in shapes.COLOURS:
            texts.append(f"Question: what colour is the {kind}?\nAnswer: {colour}")
            texts.append(f"Question: is there a {colour} {kind} in the image?\nAnswer: yes")
    return texts


# ==================================================================================
# Hugging Face hub cache
# ==================================================================================

@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """The stand-in hub cache, built once for this module; (cache dir, snapshots, seconds taken).
    Removed afterwards: it is ~2 GB, and pytest keeps the last three temporary folders."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    t0 = time.monotonic()
    snapshots = standins.build_hub_cache(cache, REVISIONS, sample_texts())
    yield cache, snapshots, time.monotonic() - t0
    shutil.rmtree(cache, ignore_errors=True)


HUB_CHECKS = r"""
import json, sys, traceback
import numpy as np
import torch
from PIL import Image
from huggingface_hub import constants, try_to_load_from_cache
from safetensors import safe_open
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, CLIPImageProcessor,
                          CLIPModel, CLIPTokenizerFast, CLIPVisionModel)
from transformers.utils import cached_file

REV = json.loads(sys.argv[1])
TEXT = sys.argv[2]
report = {"offline": bool(constants.HF_HUB_OFFLINE), "cache": str(constants.HF_HUB_CACHE)}


def section(fn):
    try:
        report[fn.__name__] = fn()
    except BaseException as e:  # one failing section must not hide the others
        report[fn.__name__] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def from_file(repo, filename, key):
    path = try_to_load_from_cache(repo, filename, revision=REV[repo])
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(key)


@section
def gpt2():
    model, info = AutoModelForCausalLM.from_pretrained("gpt2", revision=REV["gpt2"], output_loading_info=True)
    tok = AutoTokenizer.from_pretrained("gpt2", revision=REV["gpt2"])
    ids = tok(TEXT)["input_ids"]
    gen = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
    return {
        "class": type(model).__name__, "dtype": str(model.dtype),
        "missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
        "n_params": sum(p.numel() for p in model.parameters()),
        "tied": model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(),
        "wte_from_file": torch.equal(model.transformer.wte.weight, from_file("gpt2", "model.safetensors", "wte.weight")),
        "generated": gen.shape[1] - len(ids),
        "config": {k: getattr(model.config, k) for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head",
                                                          "bos_token_id", "eos_token_id", "activation_function")},
        "tok_class": type(tok).__name__, "tok_len": len(tok), "tok_max_id": max(tok.get_vocab().values()),
        "bos": tok.bos_token, "eos": tok.eos_token, "unk": tok.unk_token, "pad": tok.pad_token,
        "eos_id": tok.eos_token_id, "ids": ids, "tokens": tok.convert_ids_to_tokens(ids),
        "roundtrip": tok.decode(tok(TEXT + " Ünïcode  x")["input_ids"]),
    }


@section
def clip():
    repo = "openai/clip-vit-base-patch16"
    vision = CLIPVisionModel.from_pretrained(repo, revision=REV[repo]).eval()
    proc = CLIPImageProcessor.from_pretrained(repo, revision=REV[repo])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    pixels = proc(images=[image, image.convert("L").convert("RGB")], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        pooled = vision(pixel_values=pixels).pooler_output
    full, info = CLIPModel.from_pretrained(repo, revision=REV[repo], output_loading_info=True)
    tok = CLIPTokenizerFast.from_pretrained(repo, revision=REV[repo])
    ids = tok(TEXT)["input_ids"]
    vc, tc = full.config.vision_config, full.config.text_config
    return {
        "class": type(vision).__name__, "pixels": list(pixels.shape),
        "pooled": list(pooled.shape), "finite": bool(torch.isfinite(pooled).all()),
        "full_missing": sorted(info["missing_keys"]), "full_unexpected": sorted(info["unexpected_keys"]),
        "patch_from_file": torch.equal(vision.get_input_embeddings().weight, from_file(
            repo, "model.safetensors", "vision_model.embeddings.patch_embedding.weight")),
        "logit_scale": float(full.logit_scale),
        "vision": {k: getattr(vc, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                               "intermediate_size", "patch_size", "image_size", "hidden_act")},
        "text": {k: getattr(tc, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                             "intermediate_size", "vocab_size", "max_position_embeddings")},
        "projection_dim": full.config.projection_dim,
        "proc": {"class": type(proc).__name__, "mean": list(proc.image_mean), "std": list(proc.image_std),
                 "size": dict(proc.size), "crop": dict(proc.crop_size), "rescale": proc.rescale_factor},
        "tok_class": type(tok).__name__, "tok_len": len(tok), "tok_max_id": max(tok.get_vocab().values()),
        "tokens": tok.convert_ids_to_tokens(ids), "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=True),
    }


@section
def phi2():
    repo = "microsoft/phi-2"
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(repo, revision=REV[repo], quantization_config=q,
                                                 device_map={"": "cpu"}, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(repo, revision=REV[repo])
    ids = tok("Question: what colour is the circle?\nAnswer:", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    c = model.config
    return {
        "class": type(model).__name__, "fc1": type(model.model.layers[0].mlp.fc1).__name__,
        "logits": list(logits.shape), "finite": bool(torch.isfinite(logits).all()),
        "config": {k: getattr(c, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                                              "num_hidden_layers", "max_position_embeddings",
                                              "layer_norm_eps", "resid_pdrop", "embd_pdrop", "attention_dropout",
                                              "hidden_act", "qk_layernorm", "tie_word_embeddings", "bos_token_id",
                                              "eos_token_id")},
        "rope": {k: c.rope_parameters[k] for k in ("rope_theta", "partial_rotary_factor")},
        "rotary_ndims": model.model.layers[0].self_attn.rotary_ndims,
        "tok_class": type(tok).__name__, "tok_len": len(tok), "tok_max_id": max(tok.get_vocab().values()),
        "bos": tok.bos_token, "eos": tok.eos_token, "unk": tok.unk_token, "pad": tok.pad_token,
        "eos_id": tok.eos_token_id, "whitespace_ids": tok("a  b\t\tc")["input_ids"],
        "gpt2_ids_same": tok(TEXT)["input_ids"] == AutoTokenizer.from_pretrained("gpt2", revision=REV["gpt2"])(TEXT)["input_ids"],
    }


@section
def revisions():
    out = {}
    for repo, commit in REV.items():
        AutoConfig.from_pretrained(repo, revision="main")
        AutoTokenizer.from_pretrained(repo, revision="main")
        out[repo] = {"main_file": cached_file(repo, "config.json", revision="main"),
                     "main_path": try_to_load_from_cache(repo, "config.json", revision="main"),
                     "pinned_path": try_to_load_from_cache(repo, "config.json", revision=commit)}
    model = AutoModelForCausalLM.from_pretrained("gpt2", revision="main")
    out["gpt2_main_wte_from_file"] = torch.equal(model.transformer.wte.weight,
                                                 from_file("gpt2", "model.safetensors", "wte.weight"))
    failures = {}
    for what, call in {
        "unknown_commit_config": lambda: AutoConfig.from_pretrained("gpt2", revision="0" * 40),
        "unknown_commit_model": lambda: AutoModelForCausalLM.from_pretrained("gpt2", revision="f" * 40),
        "unknown_branch_tokenizer": lambda: AutoTokenizer.from_pretrained("microsoft/phi-2", revision="v2.0"),
        "unknown_repo": lambda: AutoConfig.from_pretrained("gpt2-medium"),
    }.items():
        try:
            call()
            failures[what] = None
        except Exception as e:
            failures[what] = [type(e).__name__, isinstance(e, OSError)]
    out["failures"] = failures
    return out


with open(sys.argv[3], "w") as f:
    json.dump(report, f)
"""

SAMPLE = "a small red circle above a large blue star on a dark background"


@pytest.fixture(scope="module")
def hub_report(hub_cache, tmp_path_factory) -> dict:
    """What transformers makes of the stand-in cache with HF_HUB_OFFLINE=1 (one subprocess; JSON)."""
    cache, _, _ = hub_cache
    tmp = tmp_path_factory.mktemp("hub_report")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp / "hf_home")}  # no token or other state from the user's home
    run_python(HUB_CHECKS, env, json.dumps(REVISIONS), SAMPLE, str(tmp / "report.json"))
    return json.loads((tmp / "report.json").read_text())


def section(report: dict, name: str) -> dict:
    got = report[name]
    assert "error" not in got, got.get("traceback", got)
    return got


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


EXPECTED_FILES = {
    "openai/clip-vit-base-patch16": {"config.json", "model.safetensors", "preprocessor_config.json", "vocab.json",
                                     "merges.txt", "tokenizer.json", "tokenizer_config.json",
                                     "special_tokens_map.json"},
    "gpt2": {"config.json", "generation_config.json", "model.safetensors", "vocab.json", "merges.txt",
             "tokenizer.json", "tokenizer_config.json"},
    "microsoft/phi-2": {"config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "added_tokens.json",
                        "special_tokens_map.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                        "tokenizer.json"},
}


@pytest.mark.slow
def test_hub_cache_has_huggingface_hub_layout(hub_cache):
    cache, snapshots, seconds = hub_cache
    sizes = {}
    for repo, commit in REVISIONS.items():
        root = cache / ("models--" + repo.replace("/", "--"))
        assert snapshots[repo] == root / "snapshots" / commit
        assert (root / "refs" / "main").read_bytes() == commit.encode()  # no trailing newline
        assert sorted(p.name for p in root.iterdir()) == ["blobs", "refs", "snapshots"]
        assert [p.name for p in (root / "snapshots").iterdir()] == [commit]
        snap = snapshots[repo]
        assert {p.name for p in snap.iterdir()} == EXPECTED_FILES[repo]
        blobs = set()
        for link in snap.iterdir():
            assert link.is_symlink()
            target = os.readlink(link)
            assert target == f"../../blobs/{Path(target).name}", target
            etag = Path(target).name
            blobs.add(etag)
            if link.suffix == ".safetensors":  # LFS files: sha256 of the content
                with open(link, "rb") as f:
                    assert etag == hashlib.file_digest(f, "sha256").hexdigest()
            else:  # git files: the git blob sha1
                data = link.read_bytes()
                assert etag == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        assert {p.name for p in (root / "blobs").iterdir()} == blobs  # nothing left half-written
        sizes[repo] = sum((root / "blobs" / b).stat().st_size for b in blobs)
    total = sum(sizes.values())
    print(f"\nbuild_hub_cache: {seconds:.1f} s, {total / 1e9:.2f} GB "
          + ", ".join(f"{r} {s / 1e6:.0f} MB" for r, s in sizes.items()))
    assert total < 2.2e9


@pytest.mark.slow
def test_hub_cache_weights_are_in_the_real_formats(hub_cache):
    _, snapshots, _ = hub_cache
    clip = _safetensors_header(snapshots["openai/clip-vit-base-patch16"] / "model.safetensors")
    gpt2 = _safetensors_header(snapshots["gpt2"] / "model.safetensors")
    for header in (clip, gpt2):
        assert header.pop("__metadata__") == {"format": "pt"}
        assert {v["dtype"] for v in header.values()} == {"F32"}
    assert clip["vision_model.embeddings.patch_embedding.weight"]["shape"] == [768, 3, 16, 16]
    assert clip["text_model.embeddings.token_embedding.weight"]["shape"] == [49408, 512]
    assert clip["visual_projection.weight"]["shape"] == [512, 768]
    # The hub's gpt2 checkpoint holds a GPT2Model: no "transformer." prefix, no (tied) lm_head.
    assert gpt2["wte.weight"]["shape"] == [50257, 768] and gpt2["wpe.weight"]["shape"] == [1024, 768]
    assert not any(k.startswith(("transformer.", "lm_head")) for k in gpt2)
    assert sum(1 for k in gpt2 if k.endswith("attn.c_attn.weight")) == 12

    phi = snapshots["microsoft/phi-2"]
    index = json.loads((phi / "model.safetensors.index.json").read_text())
    shards = {name: _safetensors_header(phi / name) for name in sorted(set(index["weight_map"].values()))}
    assert list(shards) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    total = 0
    for name, header in shards.items():
        assert header.pop("__metadata__") == {"format": "pt"}
        assert {v["dtype"] for v in header.values()} == {"F16"}
        assert {k for k, v in index["weight_map"].items() if v == name} == set(header)
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values())
    assert index["metadata"]["total_size"] == total
    keys = set(index["weight_map"])
    assert {"model.embed_tokens.weight", "lm_head.weight", "lm_head.bias", "model.final_layernorm.weight"} <= keys
    assert {k.split(".")[2] for k in keys if k.startswith("model.layers.")} == {"0", "1"}  # phi2_layers=2
    assert index["weight_map"]["model.embed_tokens.weight"].startswith("model-00001")
    assert index["weight_map"]["lm_head.weight"].startswith("model-00002")

    config = json.loads((phi / "config.json").read_text())
    assert config == {**standins.phi2_config(32), "num_hidden_layers": 2}
    assert config["torch_dtype"] == "float16" and config["architectures"] == ["PhiForCausalLM"]
    added = json.loads((phi / "added_tokens.json").read_text())
    assert sorted(added.values()) == list(range(50257, 50295))


@pytest.mark.slow
def test_gpt2_stand_in_loads_offline(hub_cache, hub_report):
    assert hub_report["offline"] is True and hub_report["cache"] == str(hub_cache[0])
    g = section(hub_report, "gpt2")
    assert g["class"] == "GPT2LMHeadModel" and g["dtype"] == "torch.float32"
    assert g["missing"] == [] and g["unexpected"] == []
    assert g["tied"] and g["wte_from_file"]  # the file's weights, not a fresh init
    assert 124_000_000 < g["n_params"] < 125_000_000
    assert g["config"] == {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                           "bos_token_id": 50256, "eos_token_id": 50256, "activation_function": "gelu_new"}
    assert g["generated"] == 3
    assert g["tok_class"] == "GPT2Tokenizer"  # transformers 5's name for GPT2TokenizerFast
    assert g["tok_len"] == 50257 and g["tok_max_id"] == 50256
    assert (g["bos"], g["eos"], g["unk"], g["pad"], g["eos_id"]) == ("<|endoftext|>",) * 3 + (None, 50256)
    # Trained on the captions: each word of one is one token ("Ġ" marks a leading space).
    assert g["tokens"] == [w if i == 0 else "Ġ" + w for i, w in enumerate(SAMPLE.split())]
    assert g["roundtrip"] == SAMPLE + " Ünïcode  x"


@pytest.mark.slow
def test_clip_stand_in_loads_offline(hub_report):
    c = section(hub_report, "clip")
    assert c["class"] == "CLIPVisionModel"
    assert c["pixels"] == [2, 3, 224, 224] and c["pooled"] == [2, 768] and c["finite"]
    assert c["full_missing"] == [] and c["full_unexpected"] == []
    assert c["patch_from_file"]
    assert c["logit_scale"] == pytest.approx(2.6592)
    assert c["vision"] == {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                           "intermediate_size": 3072, "patch_size": 16, "image_size": 224, "hidden_act": "quick_gelu"}
    assert c["text"] == {"hidden_size": 512, "num_hidden_layers": 12, "num_attention_heads": 8,
                         "intermediate_size": 2048, "vocab_size": 49408, "max_position_embeddings": 77}
    assert c["projection_dim"] == 512
    p = c["proc"]
    assert p["class"] == "CLIPImageProcessor"
    assert p["mean"] == [0.48145466, 0.4578275, 0.40821073] and p["std"] == [0.26862954, 0.26130258, 0.27577711]
    assert p["size"] == {"shortest_edge": 224} and p["crop"] == {"height": 224, "width": 224}
    assert p["rescale"] == pytest.approx(1 / 255)
    assert c["tok_class"] in ("CLIPTokenizer", "CLIPTokenizerFast")
    assert c["tok_len"] == 49408 and c["tok_max_id"] == 49407
    assert c["ids"][0] == 49406 and c["ids"][-1] == 49407
    assert c["tokens"][1:-1] == [w + "</w>" for w in SAMPLE.split()]
    assert c["decoded"] == SAMPLE


@pytest.mark.slow
def test_phi2_stand_in_loads_offline_in_4bit(hub_report):
    p = section(hub_report, "phi2")
    assert p["class"] == "PhiForCausalLM"
    assert p["fc1"] == "Linear4bit"
    assert p["logits"][0] == 1 and p["logits"][2] == 51200 and p["finite"]
    assert p["config"] == {"vocab_size": 51200, "hidden_size": 2560, "intermediate_size": 10240,
                           "num_attention_heads": 32, "num_hidden_layers": 2,
                           "max_position_embeddings": 2048, "layer_norm_eps": 1e-05, "resid_pdrop": 0.1,
                           "embd_pdrop": 0.0, "attention_dropout": 0.0, "hidden_act": "gelu_new",
                           "qk_layernorm": False, "tie_word_embeddings": False, "bos_token_id": 50256,
                           "eos_token_id": 50256}
    # config.json's legacy rope_theta / partial_rotary_factor keys, as transformers 5 reads them
    assert p["rope"] == {"rope_theta": 10000.0, "partial_rotary_factor": 0.4}
    assert p["rotary_ndims"] == 32  # 0.4 of head_dim 80
    assert p["tok_class"] in ("CodeGenTokenizer", "CodeGenTokenizerFast")
    assert p["tok_len"] == 50295 and p["tok_max_id"] == 50294 < 51200  # as the real one: fewer tokens than rows
    assert (p["bos"], p["eos"], p["unk"], p["pad"], p["eos_id"]) == ("<|endoftext|>",) * 3 + (None, 50256)
    a, b, c = (p["whitespace_ids"][i] for i in (0, 2, 4))
    assert p["whitespace_ids"] == [a, 50286, b, 50294, c]  # Phi-2's added "  " and "\t\t" tokens
    assert p["gpt2_ids_same"]


@pytest.mark.slow
def test_hub_cache_revisions_resolve_offline(hub_report):
    r = section(hub_report, "revisions")
    for repo, commit in REVISIONS.items():
        # refs/main -> the pinned snapshot, for huggingface_hub and transformers alike
        assert r[repo]["main_file"] == r[repo]["main_path"] == r[repo]["pinned_path"]
        assert r[repo]["pinned_path"].endswith(f"/snapshots/{commit}/config.json")
    assert r["gpt2_main_wte_from_file"]
    # Anything not in the cache fails offline with an OSError, as transformers raises for the real hub.
    assert set(r["failures"]) == {"unknown_commit_config", "unknown_commit_model", "unknown_branch_tokenizer",
                                  "unknown_repo"}
    assert all(v is not None and v[1] for v in r["failures"].values()), r["failures"]


def test_bpe_training_is_deterministic_across_processes(tmp_path):
    """Rust hash maps are seeded per process: the merges must not depend on it."""
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(sample_texts(60)))
    script = """
        import json, sys
        sys.path.insert(0, sys.argv[2])
        import standins
        texts = json.loads(open(sys.argv[1]).read())
        print(json.dumps([standins._bpe_merges(texts), standins._bpe_merges(texts, clip=True)]))
    """
    runs = [run_python(script, {"PYTHONHASHSEED": seed, "TOKENIZERS_PARALLELISM": "true"},
                       str(texts), str(Path(__file__).parent)).stdout for seed in ("1", "2")]
    assert runs[0] == runs[1]
    gpt2, clip = json.loads(runs[0])
    assert 100 < len(gpt2) <= standins.BPE_VOCAB - 256 and len(clip) > 100  # until every word is one token


# ==================================================================================
# torchvision ResNet-50
# ==================================================================================

def test_resnet50_weights_load_through_torchvision_offline(tmp_path):
    t0 = time.monotonic()
    path = standins.write_resnet50_weights(tmp_path / "torch", seed=0)
    seconds = time.monotonic() - t0
    assert path.parent == tmp_path / "torch" / "hub" / "checkpoints"
    print(f"\nwrite_resnet50_weights: {seconds:.1f} s, {path.stat().st_size / 1e6:.0f} MB ({path.name})")
    script = """
        import sys, torch, torchvision
        from torchvision.models import ResNet50_Weights
        assert torch.hub.get_dir() == sys.argv[1] + "/hub", torch.hub.get_dir()
        model = torchvision.models.resnet50(weights="DEFAULT")
        saved = torch.load(sys.argv[2], weights_only=True)
        state = model.state_dict()
        assert state.keys() == saved.keys()
        assert all(torch.equal(state[k], saved[k]) for k in state)
        print(ResNet50_Weights.DEFAULT.url)
    """
    p = run_python(script, {"TORCH_HOME": str(tmp_path / "torch")}, str(tmp_path / "torch"), str(path))
    assert p.stdout.strip().endswith("/" + path.name)


# ==================================================================================
# COCO 2017
# ==================================================================================

@pytest.fixture(scope="module")
def coco_src(tmp_path_factory):
    out = tmp_path_factory.mktemp("coco_src")
    t0 = time.monotonic()
    paths = standins.coco2017_archives(out, 30, 12, seed=0)
    print(f"\ncoco2017_archives(30, 12): {time.monotonic() - t0:.2f} s, "
          f"{sum(p.stat().st_size for p in paths.values()) / 1e3:.0f} kB")
    return out, paths


def test_coco_archives_have_the_official_layout(coco_src):
    out, paths = coco_src
    assert {k: v.name for k, v in paths.items()} == {n: n for n in (
        "annotations_trainval2017.zip", "train2017.zip", "val2017.zip")}
    assert all(p.parent == out for p in paths.values())
    with zipfile.ZipFile(paths["annotations_trainval2017.zip"]) as zf:
        assert set(zf.namelist()) == {"annotations/captions_train2017.json", "annotations/captions_val2017.json",
                                      "annotations/instances_val2017.json"}
        caps = {s: json.loads(zf.read(f"annotations/captions_{s}2017.json")) for s in ("train", "val")}
        instances = json.loads(zf.read("annotations/instances_val2017.json"))
    assert {"images", "annotations", "categories"} <= set(instances)
    ids = {}
    for split, n in (("train", 30), ("val", 12)):
        with zipfile.ZipFile(paths[f"{split}2017.zip"]) as zf:
            infos = zf.infolist()
        assert infos[0].filename == f"{split}2017/" and infos[0].is_dir()
        names = [i.filename for i in infos[1:]]
        assert len(names) == n and all(not i.is_dir() for i in infos[1:])
        for name in names:
            stem = name.removeprefix(f"{split}2017/").removesuffix(".jpg")
            assert len(stem) == 12 and stem.isdigit(), name
        ids[split] = {int(nm[-16:-4]) for nm in names}
        assert ids[split] == {im["id"] for im in caps[split]["images"]}
        assert {im["file_name"] for im in caps[split]["images"]} == {nm.split("/")[1] for nm in names}
    all_ids = sorted(ids["train"] | ids["val"])
    assert len(all_ids) == 42 and all_ids != list(range(all_ids[0], all_ids[0] + 42))  # sparse, disjoint


def test_coco_captions_follow_the_real_schema_and_quirks(coco_src):
    from PIL import Image

    _, paths = coco_src
    with zipfile.ZipFile(paths["annotations_trainval2017.zip"]) as zf:
        caps = {s: json.loads(zf.read(f"annotations/captions_{s}2017.json")) for s in ("train", "val")}
    ann_ids = []
    for split, data in caps.items():
        assert list(data) == ["info", "licenses", "images", "annotations"]
        assert {"description", "url", "version", "year", "contributor", "date_created"} == set(data["info"])
        for im in data["images"]:
            assert list(im) == ["license", "file_name", "coco_url", "height", "width", "date_captured",
                                "flickr_url", "id"]
            assert im["coco_url"] == f"http://images.cocodataset.org/{split}2017/{im['file_name']}"
        for a in data["annotations"]:
            assert list(a) == ["image_id", "id", "caption"]
        ann_ids += [a["id"] for a in data["annotations"]]
        per_image = Counter(a["image_id"] for a in data["annotations"])
        assert set(per_image) == {im["id"] for im in data["images"]}
        assert set(per_image.values()) <= {5, 6, 7}
        texts = [a["caption"] for a in data["annotations"]]
        assert any(t.startswith(" ") for t in texts) and any(t.endswith(" ") for t in texts)
        assert any(t.endswith("\n") for t in texts) and any("  " in t.strip() for t in texts)
        assert any(t.strip().endswith(".") for t in texts) and any(not t.strip().endswith(".") for t in texts)
        assert any(t.strip()[0].isupper() for t in texts)
    assert len(set(ann_ids)) == len(ann_ids)
    counts = Counter(n for d in caps.values() for n in Counter(a["image_id"] for a in d["annotations"]).values())
    assert counts[5] > counts[6] + counts[7] > 0  # mostly 5, a few with more

    modes, sizes = Counter(), Counter()
    meta = {im["file_name"]: im for d in caps.values() for im in d["images"]}
    for split in ("train", "val"):
        with zipfile.ZipFile(paths[f"{split}2017.zip"]) as zf:
            for name in zf.namelist()[1:]:
                img = Image.open(io.BytesIO(zf.read(name)))
                assert img.format == "JPEG"
                im = meta[name.split("/")[1]]
                assert img.size == (im["width"], im["height"])
                modes[img.mode] += 1
                sizes[img.size] += 1
    assert modes["L"] >= 2 and modes["RGB"] > modes["L"]  # greyscale in both splits, as in COCO
    assert all(w != h for w, h in sizes) and len(sizes) >= 2  # non-square, mixed orientations


def test_coco_archives_pass_the_project_ingest_and_pycocotools(coco_src, tmp_path):
    from pycocotools.coco import COCO

    from vlmpipe.data import coco
    from vlmpipe.sources import coco as coco_source

    src, _ = coco_src
    assert coco_source.ingest(src, tmp_path / "coco", 0, 0) == {"train": 30, "val": 12}
    for split in ("train", "val"):
        ds = coco.CocoCaptions(tmp_path / "coco", split)
        assert len(ds) == {"train": 30, "val": 12}[split]
        for image_id in ds.ids:
            img = ds.image(image_id)
            assert img.mode == "RGB" and img.size[0] != img.size[1]
            assert 5 <= len(ds.captions(image_id)) <= 7
    api = COCO(str(tmp_path / "coco" / "annotations" / "captions_val2017.json"))
    assert len(api.getImgIds()) == 12 and len(api.getAnnIds()) >= 60
    # A seeded subset, as coco.max_images makes.
    assert coco_source.ingest(src, tmp_path / "subset", 5, 0) == {"train": 5, "val": 5}


def test_coco_archives_are_deterministic(coco_src, tmp_path):
    _, paths = coco_src
    again = standins.coco2017_archives(tmp_path, 30, 12, seed=0)
    assert all(again[k].read_bytes() == paths[k].read_bytes() for k in paths)
    other = standins.coco2017_archives(tmp_path / "other", 30, 12, seed=1)
    assert other["val2017.zip"].read_bytes() != paths["val2017.zip"].read_bytes()


# ==================================================================================
# CIFAR-10
# ==================================================================================

@pytest.fixture(scope="module")
def cifar_tarball(tmp_path_factory):
    out = tmp_path_factory.mktemp("cifar_src")
    t0 = time.monotonic()
    path = standins.cifar10_tarball(out, train_per_class=4, test_per_class=2, seed=0)
    print(f"\ncifar10_tarball(4, 2): {time.monotonic() - t0:.2f} s, {path.stat().st_size / 1e3:.0f} kB")
    return path


def test_cifar10_tarball_has_the_official_layout(cifar_tarball):
    assert cifar_tarball.name == "cifar-10-python.tar.gz"
    assert cifar_tarball.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    with tarfile.open(cifar_tarball, "r:gz") as tf:
        members = tf.getmembers()
    assert members[0].name == "cifar-10-batches-py" and members[0].isdir()
    assert [m.name.removeprefix("cifar-10-batches-py/") for m in members[1:]] == [
        "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
        "batches.meta", "readme.html"]
    assert all(m.isfile() for m in members[1:])


def _member(tarball: Path, name: str) -> bytes:
    with tarfile.open(tarball, "r:gz") as tf:
        return tf.extractfile(f"cifar-10-batches-py/{name}").read()


def test_cifar10_batches_are_python2_pickles(cifar_tarball):
    for name in ("data_batch_1", "test_batch", "batches.meta"):
        raw = _member(cifar_tarball, name)
        ops = [(op.name, arg) for op, arg, _ in pickletools.genops(raw)]
        assert ops[0] == ("PROTO", 2) and ops[-1][0] == "STOP"
        names = {op for op, _ in ops}
        assert "SHORT_BINSTRING" in names
        assert not names & {"BINUNICODE", "SHORT_BINUNICODE", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"}
        out = io.StringIO()
        pickletools.dis(raw, out=out)
        if name != "batches.meta":
            assert ("GLOBAL", "numpy.core.multiarray _reconstruct") in ops
            assert ("GLOBAL", "numpy ndarray") in ops and ("GLOBAL", "numpy dtype") in ops
            assert "BINSTRING" in names  # the pixel data
            assert {arg for op, arg in ops if op == "GLOBAL"} == {
                "numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
        assert "numpy._core" not in out.getvalue()
    # What Python 3 gets with encoding="bytes" (the usual way to read them) ...
    d = pickle.loads(_member(cifar_tarball, "data_batch_1"), encoding="bytes")
    assert list(d) == [b"data", b"labels", b"batch_label", b"filenames"]
    assert d[b"batch_label"] == b"training batch 1 of 5"
    assert d[b"data"].dtype == np.uint8 and d[b"data"].shape == (8, 3072)
    assert all(isinstance(x, int) for x in d[b"labels"]) and all(isinstance(x, bytes) for x in d[b"filenames"])
    meta = pickle.loads(_member(cifar_tarball, "batches.meta"), encoding="bytes")
    assert meta == {b"num_cases_per_batch": 8, b"label_names": [n.encode() for n in (
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")], b"num_vis": 3072}
    # ... and with encoding="latin1" (torchvision's CIFAR10).
    d = pickle.loads(_member(cifar_tarball, "test_batch"), encoding="latin1")
    assert d["batch_label"] == "testing batch 1 of 1" and d["data"].shape == (20, 3072)


def test_cifar10_tarball_passes_the_project_reader(cifar_tarball, tmp_path):
    from vlmpipe.data import cifar
    from vlmpipe.sources import cifar as cifar_source
    from vlmpipe.core.download import safe_extract

    safe_extract(cifar_tarball, tmp_path)
    for split, per_class in (("train", 4), ("test", 2)):
        got = cifar.load_split(tmp_path, split)
        images, labels, names = cifar_source.synthetic_split(0, split, per_class)
        assert got.label_names == list(standins.CIFAR10_LABEL_NAMES)
        assert np.array_equal(got.images, images) and np.array_equal(got.labels, labels)
        assert got.filenames == names


def test_cifar10_tarball_is_deterministic(cifar_tarball, tmp_path):
    again = standins.cifar10_tarball(tmp_path, train_per_class=4, test_per_class=2, seed=0)
    assert again.read_bytes() == cifar_tarball.read_bytes()
    with gzip.open(again) as f:  # no file name or build time in the gzip header either
        f.read(1)
    assert again.read_bytes()[4:8] == (1244678400).to_bytes(4, "little")
