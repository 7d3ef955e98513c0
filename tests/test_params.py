"""Params load into typed dataclasses; every mistake is one line naming the key."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlmpipe.core.errors import UserError
from vlmpipe.core.params import SECTIONS, flatten, from_dict, load_params, params_class, to_dict
from vlmpipe.ops.preflight import ALL_SECTIONS, load_all
from vlmpipe.siglip.params import SiglipParams

Params = params_class(ALL_SECTIONS)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["params.yaml", "presets/full.yaml", "presets/tiny.yaml"])
def test_shipped_params_files_are_valid(name):
    p = load_all(ROOT / name)
    assert [f.name for f in dataclasses.fields(p)] == ["seed", "lr", *ALL_SECTIONS, "launch"]
    assert set(SECTIONS) == {*ALL_SECTIONS, "launch"}  # core's list of names and the wings' classes agree


def test_defaults_match_params_yaml():
    """params.yaml spells out every key (so `dvc params diff` shows every change) and is the one
    source of the pipeline's values: a dataclass default that differed from it (LoRA r 8 against
    32, say) would change what a partial params file or a benchmark runs, silently."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    shipped = flatten(data)
    defaults = flatten(to_dict(Params()))
    defaults.pop("phi2.train.lr")  # not in the file: the QA stage trains at the top-level lr
    assert set(shipped) == set(defaults)
    assert {k: v for k, v in defaults.items() if v != shipped[k]} == {}


def _load(tmp_path, text):
    f = tmp_path / "params.yaml"
    f.write_text(text)
    return load_all(f)


@pytest.mark.parametrize("text, key, words", [
    ('lr: "1e-4"\n', "lr", "a string"),  # quoted: a string, refused with a hint
    ("seed: 1.5\n", "seed", "expected an integer"),
    ("siglip:\n  train:\n    epochs: many\n", "siglip.train.epochs", "expected an integer"),
    ("siglip:\n  backbone: vgg\n", "siglip.backbone", "unknown backbone"),
    ("coco:\n  max_imagez: 3\n", "coco.max_imagez", "unknown key"),
    ("bogus: 1\n", "bogus", "unknown key"),
    ("lr: 2.0\n", "lr", "must be in (0, 1)"),
    ("phi2:\n  train:\n    lr: 1.0e-4\n", "phi2.train.lr", "top-level"),
    ("phi2:\n  target_modules: q_proj\n", "phi2.target_modules", "expected a list"),
    ("captioner:\n  freeze_lm: 1\n", "captioner.freeze_lm", "true or false"),
    ("coco: 3\n", "coco", "expected a section"),
    ("phi2:\n  tiny:\n    vocab_size: 400\n", "phi2.tiny.vocab_size", ">= 512"),
])
def test_bad_params_name_the_key(tmp_path, text, key, words):
    with pytest.raises(UserError) as e:
        _load(tmp_path, text)
    msg = str(e.value)
    assert f"{key}:" in msg and words in msg and "\n" not in msg
    assert str(tmp_path / "params.yaml") in msg


def test_ints_widen_to_float_and_partial_files_keep_defaults(tmp_path):
    p = _load(tmp_path, "seed: 3\nsiglip:\n  train:\n    epochs: 2\n")
    assert p.seed == 3 and p.siglip.train.epochs == 2
    assert p.siglip.train.batch_size == Params().siglip.train.batch_size
    p = from_dict({"siglip": {"logit_lr_mult": 5}}, {"siglip": SiglipParams})
    assert isinstance(p.siglip.logit_lr_mult, float) and p.siglip.logit_lr_mult == 5.0


@pytest.mark.parametrize("written, value", [("2e-4", 2e-4), ("1E-3", 1e-3), ("5.e-5", 5e-5), (".5e-3", 5e-4),
                                            ("+3e-4", 3e-4), ("1.0e-4", 1e-4), ("0.0002", 2e-4)])
def test_floats_are_read_as_dvc_reads_them(tmp_path, written, value):
    """YAML 1.2 (DVC's reading of params.yaml) takes 2e-4 without a dot as a number; so does the loader."""
    from dvc.utils.serialize import parse_yaml

    assert _load(tmp_path, f"lr: {written}\n").lr == pytest.approx(value)
    assert parse_yaml(f"lr: {written}\n", "params.yaml")["lr"] == pytest.approx(value)  # DVC agrees


def test_invalid_yaml_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"line \d+: not valid YAML"):
        _load(tmp_path, "seed: [1, 2\n")


def test_stage_reports_bad_param_without_traceback(tmp_path):
    """A stage started with a bad params file exits 2 with one line on stderr."""
    bad = tmp_path / "params.yaml"
    bad.write_text('lr: "1e-4"\n')
    code = ("from vlmpipe.core.errors import stage_entry\n"
            "from vlmpipe.core.params import load_params\n"
            "raise SystemExit(stage_entry(load_params)({}))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "lr: expected a number" in r.stderr


def test_a_stage_reads_only_its_sections(tmp_path):
    """A stage checks the sections it reads (and seed, lr, launch); another stage's section is not
    built, so its class is not imported by the stage; an unknown top-level key is still refused."""
    f = tmp_path / "params.yaml"
    f.write_text("seed: 4\nsiglip:\n  embed_dim: 64\nphi2:\n  lora_r: 0\n")
    p = load_params({"siglip": SiglipParams}, f)
    assert p.seed == 4 and p.siglip.embed_dim == 64 and not hasattr(p, "phi2")
    with pytest.raises(UserError, match="phi2.lora_r"):
        load_all(f)  # what the preflight loads: every section
    f.write_text("sigilp:\n  embed_dim: 64\n")
    with pytest.raises(UserError, match="sigilp: unknown key"):
        load_params({"siglip": SiglipParams}, f)


@pytest.mark.parametrize("name", ["params.yaml", "presets/tiny.yaml", "presets/full.yaml"])
def test_dvc_exp_run_set_changes_one_line(tmp_path, name):
    """`dvc exp run -S lr=2e-4` rewrites params.yaml through DVC's own override path (a YAML round trip
    and an OmegaConf merge): the file is written the way that path writes it ('' for empty strings,
    lists in block style), so only the changed value's line moves."""
    from dvc.utils.hydra import apply_overrides

    f = tmp_path / "params.yaml"
    f.write_text((ROOT / name).read_text())
    apply_overrides(f, ["lr=2e-4"])
    before, after = (ROOT / name).read_text().splitlines(), f.read_text().splitlines()
    assert len(before) == len(after), "\n".join(after)
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(changed) == 1 and changed[0][1].startswith("lr: 0.0002 "), changed
