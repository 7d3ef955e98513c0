"""What ``python -m vlmpipe`` does: caption image files, answer questions about one, chat about one.

A new image is featurised exactly as the training cache was: by the encoder the model records
(its weights hash must still match) and with its region scheme, so the model sees what it was
trained on. Models load once per call, with no loading bars around the one-line answers.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterable, Sequence

import torch

from vlmpipe.data import features as embeddings
from vlmpipe.core.errors import UserError
from vlmpipe.face.images import read_image
from vlmpipe.models.captioner import Captioner, load_captioner
from vlmpipe.models.chat_model import ChatModel
from vlmpipe.models.lm.prefix_lm import CONFIG_NAME, PrefixLM
from vlmpipe.models.qa_model import QAModel, load_qa_model
from vlmpipe.models.siglip.model import load_siglip


@contextlib.contextmanager
def quiet_loading():
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def featurizer(model: PrefixLM) -> Callable[[list], torch.Tensor]:
    """``fn(list of PIL images) -> [b, R, D]`` with the frozen encoder the model was trained on."""
    enc, regions = model.config.encoder, model.config.regions
    if enc.get("name") == "siglip":
        sdir = model.encoder_dir()
        if not (sdir / "model.safetensors").exists():
            raise UserError(f"{sdir}: the SigLIP model {model.model_dir} was trained with is missing "
                            "(run `dvc repro train_siglip`)")
        tower = load_siglip(sdir, model.device)
        fn, ident = embeddings.siglip_encoder(tower, regions), embeddings.encoder_identity("siglip", tower.image_tower)
    else:
        fn, ident = embeddings.clip_encoder(enc["name"], regions, model.device, enc.get("revision") or "main",
                                            key=f"{model.model_dir} encoder")
    if enc.get("hash") and ident["hash"] != enc["hash"]:
        raise UserError(f"{model.model_dir}: its encoder {enc['name']} now has weights {ident['hash']}, but the "
                        f"model was trained on features of {enc['hash']} (retrain: `dvc repro`)")
    return fn


def featurize(model: PrefixLM, images: Sequence, batch_size: int = 64) -> torch.Tensor:
    fn = featurizer(model)
    if len(images) > batch_size:  # a progress bar only where there is progress to show
        return embeddings.embed_images(fn, images, batch_size, total=len(images), desc="featurize")
    with torch.no_grad():
        return fn(list(images)).float().cpu()


def caption_images(model: Captioner, images: Sequence, beam_size: int | None = None,
                   batch_size: int = 64) -> list[str]:
    """Captions of PIL images (or uint8 HxWx3 arrays), featurised like the training cache."""
    if not len(images):
        return []
    return model.caption(featurize(model, images, batch_size), beam_size=beam_size, batch_size=batch_size)


def caption_files(model_dir: str | os.PathLike, paths: Sequence[str | os.PathLike],
                  beam_size: int | None = None, device: str = "auto") -> list[str]:
    """Caption image files with the saved captioner (``beam_size`` None: the trained default)."""
    if beam_size is not None and beam_size < 1:
        raise UserError(f"--beam-size: must be >= 1 (1 is greedy), got {beam_size}")
    images = [read_image(p) for p in paths]  # a bad file fails before any model loads
    with quiet_loading():
        model = load_captioner(model_dir, device)
    return caption_images(model, images, beam_size)


def ask_file(model_dir: str | os.PathLike, image_path: str | os.PathLike, question: str,
             history: Iterable[tuple[str, str]] = (), device: str = "auto", model: QAModel | None = None) -> str:
    """Answer ``question`` about an image file after the earlier ``history`` turns."""
    if not question.strip():
        raise UserError("question: empty (ask something about the image)")
    image = read_image(image_path)  # fail on a bad image before loading any model
    if model is None:
        with quiet_loading():
            model = load_qa_model(model_dir, device)
    return model.answer(featurize(model, [image]), [question], [list(history)])[0]


# ------------------------------------------------------------------ chat

CHAT_MODELS = {"chat": "models/chat", "qa": "models/phi2_vlm"}
HELP = "/reset starts the conversation over, /quit (or Ctrl-D) ends it"


def load_dialogue_model(name: str, device: str = "auto") -> PrefixLM:
    """A model that answers messages with a history: ``chat``, ``qa`` (the Phi-2 QA model) or a folder of either."""
    from vlmpipe.core.io import read_json_file

    d = CHAT_MODELS.get(name, name)
    cfg = read_json_file(os.path.join(d, CONFIG_NAME), f"{d}: not a trained chat or QA model") \
        if os.path.isdir(d) else None
    kind = (cfg or {}).get("kind")
    with quiet_loading():
        if kind == ChatModel.KIND:
            from vlmpipe.models.chat_model import load_chat_model
            return load_chat_model(d, device)
        if kind == QAModel.KIND:
            return load_qa_model(d, device)
    if cfg is None:
        raise UserError(f"--model: {d} is not a folder (use chat, qa or a model folder; run `dvc repro` to train them)")
    raise UserError(f"--model: {d} holds a {kind} model, which does not hold conversations (use chat or qa)")


class Conversation:
    """A multi-turn conversation with ``model`` about one image: the history is the turns so far."""

    def __init__(self, model: PrefixLM, image) -> None:
        self.model = model
        self.feats = featurize(model, [image])
        self.history: list[tuple[str, str]] = []

    def say(self, message: str) -> str:
        if not message.strip():
            raise UserError("message: empty (say something about the image)")
        reply = self.model.answer(self.feats, [message], [list(self.history)])[0]
        self.history.append((message, reply))
        return reply

    def reset(self) -> None:
        self.history.clear()


def chat(image_path: str | os.PathLike, model_name: str = "chat", messages: Sequence[str] = (),
         device: str = "auto", read: Callable[[str], str] = input, write: Callable[[str], None] = print) -> None:
    """``messages`` answered in order (one reply per line), or, with none, an interactive conversation."""
    image = read_image(image_path)  # a bad image fails before any model loads
    conv = Conversation(load_dialogue_model(model_name, device), image)
    if messages:
        for m in messages:
            write(conv.say(m))
        return
    write(f"talking about {image_path} with {conv.model.TITLE} ({HELP})")
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("")
            return
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            conv.reset()
            write("(conversation reset)")
        elif line.startswith("/"):
            write(f"unknown command {line}: {HELP}")
        elif line:
            write(f"model> {conv.say(line)}")
