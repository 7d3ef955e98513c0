"""The visual QA model (tiny Phi in 4-bit NF4 + LoRA + prefix projector).

Fixtures are generated here: ten classes with per-class facts, "cached"
embeddings = a class centre + noise (unit norm, float16, [N, 1, D]), and five
questions per image drawn from seven question types. A tiny Phi is built on
the training conversations, loaded back in 4-bit and trained briefly through
the shared loop; held-out answers must beat the blind baseline clearly.
"""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmpipe.core.errors import UserError
from vlmpipe.core.io import read_json
from vlmpipe.face import api as cli
from vlmpipe.scoring import heldout
from vlmpipe.qa.heldout import qa_scores
from vlmpipe.loop import tiny_base
from vlmpipe.data import conversations as D
from vlmpipe.models.qa_model import QA
from vlmpipe.models.lm.collate import pad_collate
from vlmpipe.models import qa_model as Q
from vlmpipe.models.lm.prefix_lm import FORMAT
from vlmpipe.qa.params import Phi2Params
from vlmpipe.core.params import TinyLMParams, TrainParams

REPO = Path(__file__).resolve().parents[1]
DIM = 512
N_TRAIN, N_TEST = 640, 100

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FACTS = {  # kind, legs, where it moves, colour
    "airplane": ("vehicle", "0", "air", "white"), "automobile": ("vehicle", "0", "road", "red"),
    "bird": ("animal", "2", "air", "brown"), "cat": ("animal", "4", "land", "gray"),
    "deer": ("animal", "4", "land", "brown"), "dog": ("animal", "4", "land", "black"),
    "frog": ("animal", "4", "water", "green"), "horse": ("animal", "4", "land", "brown"),
    "ship": ("vehicle", "0", "water", "white"), "truck": ("vehicle", "0", "road", "blue"),
}
QUESTIONS = [
    ("What is in the image?", lambda c: c),
    ("Is this an animal or a vehicle?", lambda c: FACTS[c][0]),
    ("How many legs does it have?", lambda c: FACTS[c][1]),
    ("Where does it usually move?", lambda c: FACTS[c][2]),
    ("What colour is it usually?", lambda c: FACTS[c][3]),
    ("Can it fly?", lambda c: "yes" if FACTS[c][2] == "air" else "no"),
    ("Is it alive?", lambda c: "yes" if FACTS[c][0] == "animal" else "no"),
]


def make_data(n: int, seed: int, noise: float = 0.05) -> tuple[torch.Tensor, list[list[tuple[str, str]]]]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).normal(size=(len(CLASSES), DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, len(CLASSES), n)
    emb = centres[labels] + noise * rng.normal(size=(n, DIM))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    r = random.Random(seed)
    convs = [[(q, f(CLASSES[c])) for q, f in r.sample(QUESTIONS, 5)] for c in labels]
    return torch.tensor(emb, dtype=torch.float16).unsqueeze(1), convs


def build(p, base, **kw):
    """A QA model on the tiny base at ``base`` (its features: [R=1, DIM])."""
    kw.setdefault("encoder", {"name": "test"})
    return Q.build_qa_model(p, base, "cpu", feature_dim=DIM, regions=1, **kw)


def small_params(**kw) -> Phi2Params:
    # The LM warm-up is what makes the frozen 4-bit base learnable through LoRA in few steps.
    p = Phi2Params(tiny=TinyLMParams(vocab_size=512, hidden_size=64, layers=2, heads=4, warmup_steps=300,
                                     warmup_lr=3e-3),
                   prefix_tokens=4, max_new_tokens=8, max_seq_len=160,
                   train=TrainParams(epochs=2, batch_size=16, lr=1e-3, weight_decay=0.0, warmup_ratio=0.05,
                                     grad_clip=0.5, checkpoint_every=0, device="cpu"))
    for k, v in kw.items():
        setattr(p, k, v)
    return p


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second intra-op thread buys little, and on a busy 2-core
    machine two spinning OpenMP threads per process slow everything down several-fold."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vlmpipe.core.text import EOS

    tr_emb, tr_convs = make_data(N_TRAIN, 0)
    te_emb, te_convs = make_data(N_TEST, 1)
    texts = [QA.text(c, EOS)[: -len(EOS)] for c in tr_convs]
    base = tiny_base.build("phi", small_params().tiny, texts, tmp_path_factory.mktemp("base") / "tiny_phi", seed=0)
    return {"base": base, "train": (tr_emb, tr_convs), "test": (te_emb, te_convs)}


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """A model trained through the shared loop (a few seconds of CPU), and its held-out metrics."""
    from vlmpipe.loop.train import TrainTask, fit

    p = small_params()
    torch.manual_seed(0)
    model = build(p, world["base"], encoder={"name": "test", "path": "../siglip"})
    train = D.QADataset(model.tokenizer, *world["train"], max_tokens=p.max_seq_len)
    val = D.QADataset(model.tokenizer, *world["test"], max_tokens=p.max_seq_len)
    questions = heldout.eval_questions(val, 5 * N_TEST)
    tmp = tmp_path_factory.mktemp("fit")
    answers: list[str] = []  # the last evaluation's greedy answers, as the QA stage keeps them
    task = TrainTask("phi2_vlm", model, train, model.pack, optimizer="paged_adamw",
                     evaluate=lambda m, epoch: qa_scores(m, val, 64, questions, answers))
    res = fit(task, p.train, seed=0, ckpt_dir=tmp / "ckpt", report_dir=tmp / "reports", identity={"test": 1})
    return {"model": model, "val": val, "questions": questions, "metrics": res.metrics, "tmp": tmp,
            "answers": answers}


# ---------------------------------------------------------------- template and labels

def test_labels_cover_exactly_the_answers_and_their_eos(world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(world["base"]))
    emb, convs = world["train"]
    convs = [convs[0], convs[1][:2], convs[2][:1]]  # different lengths: padding is exercised
    data = D.QADataset(tok, emb[:3], convs)
    batch = pad_collate([data[i] for i in range(3)], pad_token_id=tok.pad_token_id)
    lens = [len(data.encoded[i][0]) for i in range(3)]
    assert batch["input_ids"].shape == (3, max(lens))  # dynamic padding: the longest in the batch
    assert batch["feats"].shape == (3, 1, DIM)
    for i, turns in enumerate(convs):
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        assert mask.sum() == lens[i] and (labels[lens[i]:] == -100).all()  # padding carries no label
        on = labels != -100
        assert (labels[on] == ids[on]).all()  # a label is the token at its own position (the LM shifts)
        expected = []
        for _, a in turns:  # tokenized independently of the conversation
            expected += tok(" " + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert labels[on].tolist() == expected
        # Every labelled run is one answer followed by EOS; what is not labelled is question text.
        runs = "".join("1" if x else "0" for x in on.tolist())
        assert runs.count("01") == len(turns)
        unlabelled = tok.decode(ids[:lens[i]][~on[:lens[i]]])
        assert unlabelled == "".join(QA.user_text(q) for q, _ in turns)


def test_prompt_is_the_conversation_prefix(world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(world["base"]))
    turns = world["train"][1][3]
    ids, _ = D.encode_conversation(tok, turns)
    prompt = QA.encode_prompt(tok, turns[2][0], turns[:2])
    assert ids[:len(prompt)] == prompt  # what training saw before answer 3 is what inference feeds
    question = tok(QA.user_text("q?"), add_special_tokens=False)["input_ids"]
    assert QA.encode_prompt(tok, "q?", turns, max_tokens=20)[-len(question):] == question


# ---------------------------------------------------------------- loading

def test_base_is_4bit_and_only_lora_and_projector_train(world):
    import bitsandbytes as bnb

    model = build(small_params(), world["base"])
    base = model.lm.get_base_model()
    layer = base.model.layers[0]
    for name in ("q_proj", "k_proj", "v_proj", "dense"):
        lin = getattr(layer.self_attn, name).base_layer
        assert isinstance(lin, bnb.nn.Linear4bit) and isinstance(lin.weight, bnb.nn.Params4bit)
        assert lin.weight.quant_type == "nf4" and lin.weight.quant_state.nested  # double quantization
    for name in ("fc1", "fc2"):
        assert isinstance(getattr(layer.mlp, name).base_layer, bnb.nn.Linear4bit)
    trainable = [n for n, q in model.named_parameters() if q.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("projector.") for n in trainable)
    assert any("lora_A" in n for n in trainable) and any(n.startswith("projector.") for n in trainable)
    assert not any(isinstance(m, bnb.nn.Linear4bit) and m.weight.requires_grad for m in model.modules())


def test_the_projector_learns_at_its_multiple_of_the_adapters_rate(world):
    """phi2.projector_lr_mult: the projector's groups at lr x mult, the adapters' at lr (group 0, the one
    logged); every trainable parameter in exactly one group, weight decay on matrices only."""
    from vlmpipe.qa.stage import param_groups

    model = build(small_params(), world["base"])
    groups = param_groups(model, 1e-3, 0.01, 4.0)
    projector = {id(q) for q in model.projector.parameters()}
    trainable = [q for q in model.parameters() if q.requires_grad]
    ids = [id(q) for g in groups for q in g["params"]]
    assert sorted(ids) == sorted(id(q) for q in trainable)
    for g in groups:
        in_projector = {id(q) in projector for q in g["params"]}
        assert len(in_projector) == 1 and g["lr"] == pytest.approx(4e-3 if in_projector.pop() else 1e-3)
        assert g["weight_decay"] == (0.01 if all(q.dim() >= 2 for q in g["params"]) else 0.0)
    assert not {id(q) for q in groups[0]["params"]} & projector
    with pytest.raises(UserError, match=r"phi2\.projector_lr_mult: must be > 0"):
        small_params(projector_lr_mult=0.0).validate("phi2")


def _packed(model) -> list[bool]:
    import bitsandbytes as bnb

    return [bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
            for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_4bit_model_trains_after_an_evaluation_on_every_cpu(world):
    """Train, evaluate, train: what every epoch of the stage does.

    Guards the fix for bitsandbytes 0.50.2 on CPUs with AVX512-BF16 (`grep avx512_bf16
    /proc/cpuinfo`): its Linear4bit repacks the 4-bit weight into a CPU inference layout on the
    first eval-mode forward without gradients and never packs it back, and the next training step
    then fails with "a view of a leaf Variable that requires grad is being used in an in-place
    operation" (make repro stopped at the end of the first Phi epoch). On other CPUs bitsandbytes
    never repacks, so there the test checks the switch is set; the failing path runs where it exists.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    p = small_params()
    model = build(p, world["base"])
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    tok = model.tokenizer
    data = D.QADataset(tok, world["train"][0][:4], world["train"][1][:4])
    batch = model.collate([data[i] for i in range(4)])
    model.train()
    model(batch)["loss"].backward()
    model.eval()
    with torch.no_grad():
        heldout.teacher_forced(model, batch)
    assert not any(_packed(model))
    model.train()
    loss = model(batch)["loss"]
    loss.backward()  # raised here before the fix, on a CPU with AVX512-BF16
    assert torch.isfinite(loss)
    if has_avx512bf16():
        # The hazard is real on this machine: a layer left at bitsandbytes' default repacks, and
        # disable_4bit_repacking undoes it.
        layers[0].support_avx512bf16_for_cpu = True
        with torch.no_grad():
            model.eval()
            heldout.teacher_forced(model, batch)
        assert _packed(model)[0]
        assert Q.disable_4bit_repacking(model) == len(layers) and not any(_packed(model))
        model.train()
        model(batch)["loss"].backward()


def test_the_4bit_lora_model_runs_its_head_on_the_answers_alone(world):
    """Under PEFT, 4-bit: the loss reaches Phi's body and head past the adapter wrapper and runs the
    head on the answer tokens only, with the loss and adapter gradients of the LM's own forward."""
    model = build(small_params(), world["base"])
    body, head = model._body_and_head
    assert type(body).__name__ == "PhiModel" and head is model.lm.get_output_embeddings()
    data = D.QADataset(model.tokenizer, world["train"][0][:6], world["train"][1][:6])
    batch = model.collate([data[i] for i in range(6)])
    targets = int((batch["labels"] != -100).sum())
    assert 0 < targets < int(batch["attention_mask"].sum()) / 2  # answers are short beside their prompts
    model.train()

    def loss_and_grads():
        model.zero_grad()
        out = model(batch)
        out["loss"].backward()
        return out["loss"].detach(), {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}

    fast, fast_grads = loss_and_grads()
    model.head_on_targets = False  # the LM's own forward: every position's logits
    assert model._split_head() is None
    whole, whole_grads = loss_and_grads()
    torch.testing.assert_close(fast, whole)
    assert fast_grads.keys() == whole_grads.keys() and any("lora_" in n for n in fast_grads)
    for n in fast_grads:
        torch.testing.assert_close(fast_grads[n], whole_grads[n], rtol=1e-4, atol=1e-6)


def test_a_packed_batch_gives_the_padded_batchs_loss_and_gradients(world):
    """4-bit Phi under PEFT, conversations packed several a row (rotary positions restarting at each):
    the loss, counts and adapter gradients of the same conversations padded one a row."""
    from test_packing import assert_packed_equals_padded

    model = build(small_params(), world["base"])
    convs = [c[: 1 + i % 5] for i, c in enumerate(world["train"][1][:8])]  # 1 to 5 turns: rows pack
    data = D.QADataset(model.tokenizer, world["train"][0][:8], convs)
    assert_packed_equals_padded(model, [data[i] for i in range(8)])
    assert any("lora_" in n for n, q in model.named_parameters() if q.grad is not None)


def test_full_precision_base_for_comparison(world):
    import bitsandbytes as bnb

    model = build(small_params(load_in_4bit=False, gradient_checkpointing=False), world["base"])
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert all("lora_" in n or n.startswith("projector.") for n, q in model.named_parameters() if q.requires_grad)


def test_flash_attention_without_cuda_is_a_clear_error(world):
    with pytest.raises(UserError, match="attn_implementation: flash_attention_2"):
        build(small_params(attn_implementation="flash_attention_2"), world["base"])


def test_missing_model_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no trained QA model"):
        Q.load_qa_model(tmp_path / "nope", "cpu")


# ---------------------------------------------------------------- training, saving, answering

def test_heldout_accuracy_beats_blind_baseline(trained, world):
    from vlmpipe.scoring.metrics import BlindBaseline, normalize_answer

    blind = BlindBaseline((q, a, "t") for c in world["train"][1] for q, a in c)
    val, qs = trained["val"], trained["questions"]
    truth = [val.conversations[i][j] for i, j in qs]
    blind_acc = sum(normalize_answer(blind(q)) == normalize_answer(a) for q, a in truth) / len(truth)
    preds = heldout.predict_turns(trained["model"], val, qs)
    # The last evaluation's answers are the trained model's: the QA stage scores them by type.
    assert trained["answers"] == preds
    acc = sum(normalize_answer(p) == normalize_answer(a) for p, (_, a) in zip(preds, truth)) / len(truth)
    assert acc == pytest.approx(trained["metrics"]["exact_match"])
    assert acc >= blind_acc + 0.15, (acc, blind_acc)
    # Teacher-forced answer accuracy and greedy exact match agree up to normalisation.
    assert abs(trained["metrics"]["val_answer_acc"] - acc) < 0.05


def test_greedy_answers_are_deterministic_and_batch_independent(trained):
    model, val = trained["model"], trained["val"]
    qs = [(i, j) for i in range(4) for j in (0, 3)]
    batched = heldout.predict_turns(model, val, qs, batch_size=8)
    single = [model.answer(val.feats[i:i + 1], [val.conversations[i][j][0]], [val.conversations[i][:j]])[0]
              for i, j in qs]
    assert batched == single == heldout.predict_turns(model, val, qs, batch_size=3)


def test_save_then_load_gives_the_same_answers(trained, tmp_path):
    model, val = trained["model"], trained["val"]
    out = tmp_path / "phi2_vlm"
    model.save(out)
    for f in ("model.json", "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
              "projector.safetensors", "projector.json", "tokenizer", "lm/config.json", "lm/model.safetensors"):
        assert (out / f).exists(), f
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    cfg = read_json(out / "model.json")
    assert cfg["lm_source"] == "tiny" and cfg["extra"]["template"] == QA.record()
    assert cfg["encoder"] == {"name": "test", "path": "../siglip"}
    # Nothing names the temporary directory the tiny base was built in: saving is reproducible.
    base_tmp = str(model.base_path)
    assert not [f for f in out.rglob("*") if f.is_file() and base_tmp.encode() in f.read_bytes()]
    acfg = read_json(out / "adapter/adapter_config.json")
    assert acfg["base_model_name_or_path"] == "lm"
    assert acfg["target_modules"] == sorted(acfg["target_modules"])  # a set in peft: hash order otherwise
    again = tmp_path / "again"
    model.save(again)
    assert {f.relative_to(out): f.read_bytes() for f in out.rglob("*") if f.is_file()} == \
        {f.relative_to(again): f.read_bytes() for f in again.rglob("*") if f.is_file()}
    loaded = Q.load_qa_model(out, "cpu")
    # Answering takes the same 4-bit path as training, on any CPU (no AVX512-BF16 repacking).
    assert not [m for m in loaded.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    qs = [(i, j) for i in range(6) for j in range(5)]
    assert heldout.predict_turns(loaded, val, qs) == heldout.predict_turns(model, val, qs)
    assert not loaded.training


# ---------------------------------------------------------------- command line

@pytest.fixture(scope="module")
def cli_model(trained, tmp_path_factory):
    """models/phi2_vlm + models/siglip side by side, as the pipeline writes them, and an image file."""
    from PIL import Image

    from vlmpipe.models.siglip.model import build_siglip
    from vlmpipe.siglip.params import SiglipParams

    from vlmpipe.data.features import siglip_identity

    root = tmp_path_factory.mktemp("models")
    tower = build_siglip(SiglipParams(), ["a photo of a cat", "a photo of a dog", "what is this animal?"])
    tower.eval()
    tower.save(root / "siglip")
    model = trained["model"]
    encoder = model.config.encoder
    model.config.encoder = {**siglip_identity(root / "siglip"), "path": "../siglip"}  # as the stage records it
    try:
        model.save(root / "phi2_vlm")
    finally:
        model.config.encoder = encoder
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = root / "cat.png"
    Image.fromarray(img).save(path)
    return root, path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmpipe", "ask", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow  # the CLI in a subprocess
def test_cli_ask_answers_an_image_file_whatever_the_text(cli_model):
    """One answer line, equal to the in-process answer, for a question and history that mean something to a
    browser, a template, a spreadsheet or a terminal (markup, formulas, a newline, bidi controls, emoji)."""
    from vlmpipe.face.images import read_image

    root, image = cli_model
    question = "<script>alert(1)</script> $x^2$ {{7*7}} =cmd|' /C calc'!A0 How many legs?"
    history = [("\u202eevil\u202c 👩\u200d👩\u200d👧 \"quoted\" what is it?", "a,b\nc =1+1")]
    r = _cli(str(image), question, "--history", *history[0], "--model", str(root / "phi2_vlm"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and r.stdout.endswith("\n")
    # The same answer as encoding the file with the recorded SigLIP tower in-process.
    model = Q.load_qa_model(root / "phi2_vlm", "cpu")
    emb = cli.featurize(model, [read_image(image)])
    expected = model.answer(emb, [question], [history])[0]
    assert r.stdout == " ".join(expected.split()) + "\n"  # the CLI writes a reply as one line
    assert cli.ask_file(root / "phi2_vlm", image, question, history, device="cpu") == expected


def test_cli_missing_or_broken_image_is_one_line_error(cli_model, tmp_path):
    root, _ = cli_model
    r = _cli(str(tmp_path / "missing.png"), "What is it?", "--model", str(root / "phi2_vlm"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.png'}: image file not found"]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(UserError, match="^" + re.escape(f"{bad}: cannot read image")):  # in-process: one interpreter start is enough
        cli.ask_file(root / "phi2_vlm", bad, "What is it?", device="cpu")


def test_unknown_target_module_names_the_choices(world):
    with pytest.raises(UserError) as e:
        build(small_params(target_modules=["q_proj", "qkv"]), world["base"])
    msg = str(e.value)
    assert msg.startswith("phi2.target_modules: tiny has no linear layer named 'qkv' (it has: ")
    assert "dense" in msg and "fc1" in msg and "\n" not in msg


@pytest.mark.parametrize("damage", ["config_not_json", "config_incomplete", "adapter_missing", "adapter_truncated",
                                    "projector_truncated", "tokenizer_missing"])
def test_damaged_model_folder_is_one_line(trained, tmp_path, damage):
    import shutil

    out = tmp_path / "phi2_vlm"
    trained["model"].save(out)
    if damage == "config_not_json":
        (out / "model.json").write_text("{\"format\": ")
    elif damage == "config_incomplete":
        (out / "model.json").write_text(json.dumps({"format": FORMAT}))
    elif damage == "adapter_missing":
        shutil.rmtree(out / "adapter")
    elif damage == "adapter_truncated":
        f = out / "adapter/adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "projector_truncated":
        f = out / "projector.safetensors"
        f.write_bytes(f.read_bytes()[:64])
    else:
        shutil.rmtree(out / "tokenizer")
    with pytest.raises(UserError) as e:
        Q.load_qa_model(out, "cpu")
    assert str(out) in str(e.value) and "\n" not in str(e.value), str(e.value)


# bitsandbytes' CPU back end imported as on a CPU with AVX512-BF16 (the check is replaced, the module
# re-run): there it tries the Hub's `kernels` package and warns. LOGGING sets up the process's log.
_AVX512_BF16_IMPORT = """
import importlib, logging
{logging}
import bitsandbytes.functional as F
import bitsandbytes.backends.cpu.ops as ops
F.has_avx512bf16 = lambda: True
importlib.reload(ops)
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("another bitsandbytes warning")
"""


@pytest.mark.slow  # two processes importing torch and bitsandbytes
def test_the_bitsandbytes_kernel_warning_stays_out_of_the_log():
    """Every QA stage, `ask` and `serve` printed bitsandbytes' "Failed to load CPU gemm_4bit_forward from
    kernels-community" on AVX512-BF16 CPUs: nothing the user can act on (the fallback is bitsandbytes'
    own kernel, which every other CPU runs). The project's logging drops that message and only it."""
    def run(setup: str) -> str:
        r = subprocess.run([sys.executable, "-c", _AVX512_BF16_IMPORT.format(logging=setup)], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stderr

    plain = run("logging.basicConfig()")
    assert "kernels-community" in plain and "another bitsandbytes warning" in plain  # the replay warns
    ours = run("from vlmpipe.core.errors import setup_logging; setup_logging()")
    assert "kernels-community" not in ours and "another bitsandbytes warning" in ours, ours[-2000:]
