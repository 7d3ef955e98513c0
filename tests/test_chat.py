"""The chat model: template and labels, windows at turn boundaries, continuing a captioner, the chat CLI.

Small fixtures: a tiny GPT-2 captioner (hidden 32) on random "cached" features, continued through
the shared loop on conversations that can only be answered with the earlier turn and the image.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmpipe.face import api as cli
from vlmpipe.chat import heldout
from vlmpipe.data import chat as C
from vlmpipe.models.chat_model import CHAT
from vlmpipe.models.lm.collate import IGNORE_INDEX
from vlmpipe.core.errors import UserError
from vlmpipe.models import captioner as CAP
from vlmpipe.models.chat_model import ChatModel, load_chat_model
from vlmpipe.core.params import TinyLMParams, TrainParams
from vlmpipe.scoring.heldout import predict_turns
from vlmpipe.loop import tiny_base

FEAT_DIM, REGIONS, N = 16, 5, 24
COLOURS = ["red", "blue", "green", "yellow"]
SHAPES = ["star", "ring"]


def _world_conversations(n: int):
    """Image i shows a star and a ring of colours c(i, star), c(i, ring); turn 2 asks about "it", the shape
    turn 1 named: the reply needs the image (the colour) and the history (which shape)."""
    rng = np.random.default_rng(0)
    facts = [{s: COLOURS[int(rng.integers(4))] for s in SHAPES} for _ in range(n)]
    convs = []
    for i, f in enumerate(facts):
        s = SHAPES[i % 2]
        convs.append([(f"Is there a {s}?", "yes"), ("What colour is it?", f[s])])
    feats = torch.zeros(n, REGIONS, FEAT_DIM)
    for i, f in enumerate(facts):  # the colours are written into the features, one region per shape
        feats[i, 1, COLOURS.index(f["star"])] = 3.0
        feats[i, 2, 4 + COLOURS.index(f["ring"])] = 3.0
    return feats, convs, facts


@pytest.fixture(scope="module")
def captioner_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    texts = [q + " " + a for _, c, _ in [_world_conversations(N)] for conv in c for q, a in conv]
    lm_dir = tiny_base.build("gpt2", TinyLMParams(vocab_size=512, hidden_size=32, layers=2, heads=2, warmup_steps=0),
                             texts + ["a red star and a blue ring"] * 4, root / "tiny", seed=0)
    cap = CAP.build_captioner(lm_dir, encoder={"name": "test-encoder"}, feature_dim=FEAT_DIM, regions=REGIONS,
                              prefix_tokens=10, freeze_lm=False, beam_size=2, max_caption_tokens=20, seed=0)
    cap.save(root / "captioner")
    return root / "captioner"


def _chat(captioner_dir, max_seq_len=0):
    return ChatModel.from_captioner(CAP.load_captioner(captioner_dir), max_seq_len=max_seq_len, max_new_tokens=6)


@pytest.fixture(scope="module")
def trained(captioner_dir, tmp_path_factory):
    from vlmpipe.loop.train import TrainTask, fit

    root = tmp_path_factory.mktemp("chat-trained")
    model = _chat(captioner_dir)
    feats, convs, facts = _world_conversations(N)
    data = C.ChatDataset(model.tokenizer, feats, range(N), convs, model.window)
    task = TrainTask("chat", model, data, model.pack)
    fit(task, TrainParams(epochs=120, batch_size=8, lr=1e-2, weight_decay=0.0, warmup_ratio=0.05, checkpoint_every=0,
                          device="cpu"), seed=0, ckpt_dir=root / "ckpt", report_dir=root / "reports", identity={})
    model.eval()
    model.save(root / "model")
    return model, data, facts, root / "model"


# ------------------------------------------------------------------ template, labels, windows


def test_labels_cover_the_assistant_turns_and_their_eos_only(captioner_dir):
    tok = _chat(captioner_dir).tokenizer
    (ids1, lab1), (ids2, lab2) = CHAT.encode_turns(tok, [("Is there a star?", "yes"), ("What colour is it?", "red")])
    user = tok("User: Is there a star?\nAssistant:", add_special_tokens=False)["input_ids"]
    assert ids1[:len(user)] == user and set(lab1[:len(user)]) == {IGNORE_INDEX}
    assert lab1[len(user):] == ids1[len(user):] and ids1[-1] == tok.eos_token_id
    assert tok.decode(ids1[len(user):-1]).strip() == "yes"
    assert sum(t != IGNORE_INDEX for t in lab2) == len(tok(" red", add_special_tokens=False)["input_ids"]) + 1


def test_windows_drop_whole_turns_from_the_front_and_train_each_turn_once():
    enc = [([i] * n, [IGNORE_INDEX] * (n - 2) + [i, i]) for i, n in enumerate([5, 6, 4, 7, 3], start=1)]
    w = C.windows(enc, 12)
    # Latest turns first: [3 4 5] = 4+7+3 = 14 > 12 -> [4 5]; then [2 3], then [1].
    assert [sorted(set(ids)) for ids, _ in w] == [[1], [2, 3], [4, 5]]
    trained = [t for _, lab in w for t in lab if t != IGNORE_INDEX]
    assert sorted(trained) == sorted(t for _, lab in enc for t in lab if t != IGNORE_INDEX)
    assert all(len(ids) <= 12 for ids, _ in w)
    # A single turn longer than the window keeps its start.
    (ids, lab), = C.windows([([9] * 20, [9] * 20)], 8)
    assert ids == [9] * 8 and lab == [9] * 8


def test_the_prompt_is_what_training_saw_before_the_answer(captioner_dir):
    tok = _chat(captioner_dir).tokenizer
    turns = [("Is there a star?", "yes"), ("What colour is it?", "red"), ("And the ring?", "blue")]
    (ids, labels), = C.windows(CHAT.encode_turns(tok, turns), 200)
    prompt = CHAT.encode_prompt(tok, "And the ring?", turns[:2])
    assert ids[:len(prompt)] == prompt and labels[len(prompt) - 1] == IGNORE_INDEX != labels[len(prompt)]
    # Too long: whole oldest turns go first, the message stays.
    short = CHAT.encode_prompt(tok, "And the ring?", turns[:2], max_tokens=len(prompt) - 1)
    assert short == prompt[len(CHAT.encode_turns(tok, turns[:1])[0][0]):]


# ------------------------------------------------------------------ the model


def test_a_text_only_conversation_trains_without_an_image(captioner_dir):
    """A text-only conversation (image row None) gets no image prefix: its logits do not move with the
    features in its slot, an image conversation's do; its loss and gradients are finite."""
    from types import SimpleNamespace

    from vlmpipe.data import llava

    model = _chat(captioner_dir).eval()
    feats, convs, _ = _world_conversations(2)
    records = [llava.record("1", "000000000007.jpg", convs[0]), {"id": "t", "conversations": [
        {"from": "human", "value": q} if k % 2 == 0 else {"from": "gpt", "value": a}
        for q, a in convs[1] for k in (0, 1)]}]
    cache = SimpleNamespace(ids=np.array([7]), embeddings=feats[:1].numpy())
    got, rows = C.conversation_features(records, [cache], "train.json")
    assert rows == [0, None] and torch.equal(got, feats[:1])
    data = C.ChatDataset(model.tokenizer, got, rows, [llava.turns_of(r) for r in records], model.window)
    assert "has_image" not in model.collate([data[0]])  # image-only batches are as before
    batch = model.collate([data[0], data[1]])
    assert batch["has_image"].tolist() == [True, False] and not batch["feats"][1].any()
    with torch.no_grad():
        logits, labels = model.text_logits(batch)
        for row in (0, 1):
            moved = {**batch, "feats": batch["feats"].clone()}
            moved["feats"][row] = torch.randn(moved["feats"][row].shape, generator=torch.Generator().manual_seed(0))
            targets = labels[row] != IGNORE_INDEX  # the logits the loss reads (the assistant's tokens)
            changed = (model.text_logits(moved)[0][row][targets] - logits[row][targets]).abs().max().item()
            assert (changed > 1e-4) if row == 0 else (changed < 1e-5), (row, changed)
    model.train()
    out = model(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and all(torch.isfinite(q.grad).all() for q in model.parameters()
                                               if q.grad is not None)


def test_a_packed_batch_gives_the_padded_batchs_loss_and_gradients(captioner_dir):
    """Conversations packed several a row, a text-only one among them: the loss, counts and gradients of
    the same conversations padded one a row."""
    from test_packing import assert_packed_equals_padded

    model = _chat(captioner_dir)
    feats, convs, _ = _world_conversations(6)
    convs[3] = convs[3][:1]  # of other lengths, so rows pack
    convs[4] = convs[4] + convs[5]
    data = C.ChatDataset(model.tokenizer, feats, [0, 1, 2, None, 4, 5], convs, model.window)
    assert data[3]["has_image"] is False
    assert_packed_equals_padded(model, [data[i] for i in range(6)])


def test_starts_as_the_captioner_and_sizes_its_window(captioner_dir):
    cap = CAP.load_captioner(captioner_dir)
    model = _chat(captioner_dir)
    assert model.config.kind == "chat" and model.config.encoder == cap.config.encoder
    assert model.window == model.lm.config.n_positions - cap.config.prefix_tokens
    assert _chat(captioner_dir, max_seq_len=64).window == 64
    for a, b in zip(model.state_dict().values(), cap.state_dict().values()):
        assert torch.equal(a, b)
    assert all(p.requires_grad for p in model.parameters())


def test_learns_to_answer_from_the_image_and_the_earlier_turn(trained):
    model, data, facts, _ = trained
    turns = [(i, 1) for i in range(N)]
    with_history = predict_turns(model, data, turns)
    assert sum(r == facts[i][SHAPES[i % 2]] for (i, _), r in zip(turns, with_history)) >= 0.9 * N, with_history
    # The same question with the earlier turn removed cannot know which shape "it" is.
    alone = predict_turns(model, data, turns, history=False)
    assert alone != with_history
    replies: list[str] = []
    scores = heldout.chat_scores(model, data, turns, replies=replies)
    assert scores["exact_match"] >= 0.9 and 0 < scores["val_loss"] < 1.0
    assert replies == with_history  # the scored replies, handed back for the stage's log


def test_save_load_gives_the_same_replies(trained):
    model, data, _, path = trained
    again = load_chat_model(path)
    turns = [(i, j) for i in range(6) for j in range(2)]
    assert predict_turns(again, data, turns) == predict_turns(model, data, turns)
    with pytest.raises(UserError, match=r"a captioner model, not a chat model"):
        load_chat_model(_captioner_of(path))


def _captioner_of(path):
    from pathlib import Path

    return Path(load_chat_model(path).config.extra["from_captioner"])


# ------------------------------------------------------------------ the chat front end


def test_conversation_keeps_history_and_resets(trained, monkeypatch):
    model, data, facts, path = trained
    monkeypatch.setattr(cli, "featurize", lambda m, images, batch_size=64: data.feats[:1])
    conv = cli.Conversation(model, image=None)
    assert conv.say("Is there a star?") == "yes"
    assert conv.say("What colour is it?") == facts[0]["star"] and len(conv.history) == 2
    conv.reset()
    assert conv.history == []
    with pytest.raises(UserError, match="message: empty"):
        conv.say("  ")


def test_interactive_chat_reads_until_quit(trained, monkeypatch, tmp_path):
    from PIL import Image

    _, data, facts, path = trained
    monkeypatch.setattr(cli, "featurize", lambda m, images, batch_size=64: data.feats[:1])
    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(img)
    said = iter(["Is there a star?", "What colour is it?", "/reset", "/oops", "", "/quit", "never read"])
    out: list[str] = []
    cli.chat(img, str(path), read=lambda prompt: next(said), write=out.append)
    assert out[0].startswith(f"talking about {img} with chat model")
    assert out[1:] == ["model> yes", f"model> {facts[0]['star']}", "(conversation reset)",
                       "unknown command /oops: " + cli.HELP]
    out.clear()
    cli.chat(img, str(path), messages=["Is there a star?", "What colour is it?"], write=out.append)
    assert out == ["yes", facts[0]["star"]]


def test_chat_model_argument_errors(trained, tmp_path):
    _, _, _, path = trained
    with pytest.raises(UserError, match=r"--model: .* is not a folder"):
        cli.load_dialogue_model(str(tmp_path / "nothing"))
    with pytest.raises(UserError, match=r"holds a captioner model, which does not hold conversations"):
        cli.load_dialogue_model(str(_captioner_of(path)))
    assert cli.load_dialogue_model(str(path)).config.kind == "chat"
