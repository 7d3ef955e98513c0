"""The trained models as one MLflow pyfunc model: what ``mlflow models serve`` and
``mlflow.pyfunc.load_model`` run. ``vlmpipe/ops/registry.py`` logs it ("models from code": MLflow
stores this file with the model and runs it at load time; nothing is pickled).

It is the command line's back end (``vlmpipe/face/api.py``) behind a pandas interface, not a second
inference path: images are read like ``read_image`` reads a file, featurised by the encoder the
model records (``cli.featurize``), and answered by the model's own ``caption`` / ``answer``.
Stages do not import this module, so editing it retrains nothing (like editing the CLI).

Input: a DataFrame, one row per request. ``image`` holds the image file's bytes (PNG, JPEG, ...)
base64-encoded, in every kind. Then, by kind (``model_config["kind"]``):

=========== ========================================== ==========================================
kind        more columns                               output, one per row
=========== ========================================== ==========================================
captioner   none                                       the caption (str)
qa          ``question`` (str), ``history`` (optional) the answer (str)
chat        ``message`` (str), ``history`` (optional)  the reply (str)
siglip      ``text`` (str, optional)                   ``image_embedding`` (512 floats, unit norm)
                                                       [+ ``text_embedding`` when ``text`` is given]
=========== ========================================== ==========================================

``history`` is the conversation so far about that image: a list of ``[user turn, model turn]``
pairs, oldest first (empty or missing: a new conversation). The server is stateless: a client
keeps the history and sends it with each new turn, as ``python -m vlmpipe chat`` keeps it.

A file path in ``image`` is not accepted: a served model would read files of the server's
machine that a client names. Encode the file: ``base64.b64encode(open(path, "rb").read()).decode()``.
Bad input (not base64, not an image, an empty question, a missing column) raises one
``MlflowException`` line naming the row, which the scoring server answers with HTTP 400.
"""
from __future__ import annotations

import base64
import binascii
import math

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from vlmpipe.core.errors import UserError, one_line
from vlmpipe.core.images import decode_image

# The models and the CLI back end are imported in load_context, not here: MLflow runs this file
# once when a training stage logs the model, and importing them there cost the stage ~2 s.

# The text column each dialogue kind answers.
PROMPT_COLUMN = {"qa": "question", "chat": "message"}


def _bad(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(one_line(message))


def _decode(value, row: int) -> bytes:
    if not isinstance(value, str):
        raise _bad(f"image in row {row}: expected base64-encoded image file bytes (a string), "
                   f"got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"image in row {row}: not base64 (send the image file's bytes base64-encoded; "
                   "a file path is not read)") from None


def read_images(values) -> list:
    """RGB PIL images from base64 file bytes, through the face's one reader (so a corrupt, truncated or
    non-image file fails here as it fails for the CLI), named by row."""
    out = []
    for row, value in enumerate(values):
        try:
            out.append(decode_image(_decode(value, row), f"image in row {row}"))
        except UserError as e:
            raise _bad(str(e)) from None
    return out


def _histories(df, n: int) -> list[list[tuple[str, str]]]:
    if "history" not in df.columns:
        return [[] for _ in range(n)]
    out = []
    for row, turns in enumerate(df["history"]):
        if turns is None or (isinstance(turns, float) and math.isnan(turns)):  # missing: a new conversation
            turns = []
        pairs = []
        for turn in turns:
            if len(turn) != 2 or not all(isinstance(t, str) for t in turn):
                raise _bad(f"history in row {row}: expected a list of [user turn, model turn] string pairs")
            pairs.append((turn[0], turn[1]))
        out.append(pairs)
    return out


class VlmpipeModel(PythonModel):
    """One of the pipeline's trained models; which one is ``model_config["kind"]`` (see the module docstring)."""

    def load_context(self, context) -> None:
        from vlmpipe.face import api as cli
        from vlmpipe.data import features as embeddings
        from vlmpipe.models.siglip.model import load_siglip
        from vlmpipe.core.runtime import resolve_device

        self.kind = context.model_config["kind"]
        model_dir = context.artifacts["model"]
        if self.kind == "siglip":
            self.model = load_siglip(model_dir, resolve_device("auto"))
            self.encode = embeddings.siglip_encoder(self.model, 1)  # as precompute_embeddings embeds
            return
        if self.kind == "captioner":
            self.model = cli.load_captioner(model_dir, "auto")
        else:
            self.model = cli.load_dialogue_model(model_dir, "auto")
        if "encoder" in context.artifacts:
            # The trained SigLIP logged beside the model: the features come from this copy, not from
            # the folder the model was trained next to (checked against the recorded weights hash).
            self.model.config.encoder = {**self.model.config.encoder, "path": context.artifacts["encoder"]}

    def predict(self, context, model_input: pd.DataFrame, params=None):
        from vlmpipe.face import api as cli

        df = model_input
        if "image" not in df.columns:
            raise _bad("missing column 'image' (base64-encoded image file bytes, one image per row)")
        images = read_images(df["image"])
        try:
            if self.kind == "siglip":
                return self._embed(df, images)
            if self.kind == "captioner":
                return cli.caption_images(self.model, images)
            return self._answer(df, images)
        except UserError as e:  # e.g. the encoder's weights no longer match the model's record
            raise _bad(str(e)) from None

    def _answer(self, df, images) -> list[str]:
        from vlmpipe.face import api as cli

        col = PROMPT_COLUMN[self.kind]
        if col not in df.columns:
            raise _bad(f"missing column {col!r}: the {self.model.TITLE} answers a {col} about each image")
        prompts = list(df[col])
        for row, text in enumerate(prompts):
            if not isinstance(text, str) or not text.strip():
                raise _bad(f"{col} in row {row}: empty (say something about the image)")
        if not images:
            return []
        return self.model.answer(cli.featurize(self.model, images), prompts, _histories(df, len(prompts)))

    def _embed(self, df, images) -> pd.DataFrame:
        import torch

        with torch.no_grad():
            image_emb = self.encode(images)[:, 0] if images else torch.empty(0, 0)
        out = pd.DataFrame({"image_embedding": [row.tolist() for row in image_emb]})
        if "text" in df.columns:
            texts = list(df["text"])
            for row, text in enumerate(texts):
                if not isinstance(text, str):
                    raise _bad(f"text in row {row}: expected a string, got {type(text).__name__}")
            out["text_embedding"] = [row.tolist() for row in self.model.encode_texts(texts)]
        return out


set_model(VlmpipeModel())
