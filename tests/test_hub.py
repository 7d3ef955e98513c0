"""Hub models at pinned revisions (vlmpipe/core/hub.py), from a pre-placed Hugging Face cache.

Small models built here are put into a hub cache under made-up repo ids; HF_HUB_OFFLINE is on, so
anything not in the cache fails the way it would on an offline machine.
"""
from __future__ import annotations

import pytest
import torch

from vlmpipe.core import hub
from vlmpipe.core.errors import UserError
from vlmpipe.core.params import TinyLMParams

COMMIT = "1" * 40
OTHER = "2" * 40


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    from vlmpipe.loop.tiny_base import build as build_tiny_base

    texts = ["a red circle", "a blue star on a dark background", "two green rings"] * 4
    return build_tiny_base("gpt2", TinyLMParams(vocab_size=512, hidden_size=32, layers=1, heads=2, warmup_steps=0),
                         texts, tmp_path_factory.mktemp("lm") / "gpt2", seed=0)


def test_a_cached_commit_loads_offline_and_is_recorded(offline_cache, tiny_gpt2):
    from transformers import AutoModelForCausalLM

    from standins import cache_folder

    cache_folder(offline_cache, "acme/tiny-gpt2", COMMIT, tiny_gpt2)
    lm = hub.load(AutoModelForCausalLM, "acme/tiny-gpt2", COMMIT, "captioner.lm")
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2))
    torch.testing.assert_close(lm.get_input_embeddings().weight, ref.get_input_embeddings().weight)
    assert hub.resolved_commit("acme/tiny-gpt2", COMMIT) == COMMIT
    assert hub.resolved_commit("acme/tiny-gpt2", "main") == COMMIT  # the branch, resolved to what it points at
    assert hub.resolved_commit(str(tiny_gpt2), "main") is None  # a folder has no commit


@pytest.mark.parametrize("name, revision", [("acme/tiny-gpt2", OTHER), ("acme/absent", COMMIT)])
def test_what_is_not_in_the_cache_offline_is_one_line(offline_cache, tiny_gpt2, name, revision):
    from transformers import AutoModelForCausalLM

    from standins import cache_folder

    cache_folder(offline_cache, "acme/tiny-gpt2", COMMIT, tiny_gpt2)
    with pytest.raises(UserError) as e:
        hub.load(AutoModelForCausalLM, name, revision, "phi2.base_model")
    msg = str(e.value)
    assert msg.startswith(f"phi2.base_model: {name}@{revision} is not in the Hugging Face cache ({offline_cache})")
    assert "HF_HUB_OFFLINE=1" in msg and f"hf download {name} --revision {revision}" in msg and "\n" not in msg


def test_captioner_records_the_commit_of_its_hub_lm(offline_cache, tiny_gpt2, tmp_path):
    from standins import cache_folder
    from vlmpipe.models import captioner as C

    cache_folder(offline_cache, "acme/tiny-gpt2", COMMIT, tiny_gpt2)
    m = C.build_captioner("acme/tiny-gpt2", encoder={"name": "t"}, feature_dim=8, regions=1, prefix_tokens=2,
                          freeze_lm=True, beam_size=1, max_caption_tokens=8, lm_revision="main")
    assert m.config.lm_revision == COMMIT  # "main" today, pinned to what it was
    m.save(tmp_path / "cap")
    # A frozen hub LM is not copied: it is loaded again at the recorded commit.
    assert not (tmp_path / "cap/lm/model.safetensors").exists()
    again = C.load_captioner(tmp_path / "cap")
    torch.testing.assert_close(again.lm.get_input_embeddings().weight, m.lm.get_input_embeddings().weight)


def test_qa_model_on_a_hub_base_records_and_checks_it(offline_cache, tmp_path):
    """The adapter references the hub base by commit; load_qa_model loads that commit and refuses a
    base of another width (what a different model under the same name would be)."""
    from standins import cache_folder
    from test_phi_vlm import build, make_data, small_params
    from vlmpipe.models.qa_model import QA
    from vlmpipe.models.qa_model import load_qa_model
    from vlmpipe.core.text import EOS
    from vlmpipe.loop.tiny_base import build as build_tiny_base

    emb, convs = make_data(8, 0)
    texts = [QA.text(c, EOS)[: -len(EOS)] for c in convs]
    tiny = TinyLMParams(vocab_size=512, hidden_size=32, layers=1, heads=2, warmup_steps=0)
    base = build_tiny_base("phi", tiny, texts, tmp_path / "phi", seed=0)
    cache_folder(offline_cache, "acme/tiny-phi", COMMIT, base)
    p = small_params(base_model="acme/tiny-phi", revision=COMMIT, tiny=tiny)
    model = build(p, "acme/tiny-phi")
    assert model.config.lm_revision == COMMIT and model.config.lm_source == "acme/tiny-phi"
    model.save(tmp_path / "vlm")
    assert not (tmp_path / "vlm/lm").exists()  # the hub base is referenced, not copied
    loaded = load_qa_model(tmp_path / "vlm", "cpu")
    q = loaded.answer(emb[:2], ["What is in the image?"] * 2)
    assert q == model.answer(emb[:2], ["What is in the image?"] * 2)

    wider = build_tiny_base("phi", TinyLMParams(vocab_size=512, hidden_size=64, layers=1, heads=2, warmup_steps=0),
                          texts, tmp_path / "phi64", seed=0)
    cache_folder(offline_cache, "acme/tiny-phi", OTHER, wider)
    cfg = tmp_path / "vlm/model.json"
    cfg.write_text(cfg.read_text().replace(COMMIT, OTHER))
    with pytest.raises(UserError, match="has hidden size 64, but the projector was trained for 32"):
        load_qa_model(tmp_path / "vlm", "cpu")


def test_unpinned_hub_model_is_warned_about(caplog, tiny_gpt2):
    hub.warn_unpinned("gpt2", "main", "captioner.lm_revision")
    assert "pin a 40-hex commit hash" in caplog.text
    caplog.clear()
    hub.warn_unpinned("gpt2", COMMIT, "captioner.lm_revision")
    hub.warn_unpinned(str(tiny_gpt2), "main", "captioner.lm_revision")
    assert caplog.text == ""
