"""The chat model: the trained captioner continued on multi-turn conversations about an image.

Same parts as the captioner (``models/captioner.py``): the frozen encoder's cached features, its
MLP projector into K prefix vectors, its GPT-2 — all three carried over from the captioner and
fine-tuned further on the conversations in the chat template (``vlmpipe.models.lm.templates.CHAT``). It answers
a message (``answer``) greedily, the earlier turns of the conversation as the prompt's history;
the image stays the prefix throughout. The QA model has the same ``answer``, so one chat front
end (``python -m vlmpipe chat``) talks to either.

Saved like the captioner (``lm/`` is the fine-tuned GPT-2); ``config.extra`` records the
template and the captioner it started from.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from vlmpipe.core import hub
from vlmpipe.models.lm.templates import PromptTemplate
from vlmpipe.core.errors import UserError
from vlmpipe.models.lm.prefix_lm import CONFIG_NAME, PrefixLM, PrefixLMConfig

REBUILD = "run `dvc repro train_gpt2_chat` (or `dvc checkout models/chat`)"

# The prompt template this model is trained and asked in (recorded in the saved model).
CHAT = PromptTemplate("chat-v1", "User: {}\nAssistant:", " {}", "assistant tokens + the EOS after each assistant turn",
                      keys=("user", "assistant"), slots=("text", "text"))



class ChatModel(PrefixLM):
    KIND, TITLE = "chat", "chat model"

    @classmethod
    def from_captioner(cls, captioner: PrefixLM, *, max_seq_len: int, max_new_tokens: int) -> "ChatModel":
        """A chat model that starts as ``captioner`` (its LM, projector, tokenizer and encoder).

        ``max_seq_len``: text tokens of a prompt (0: the LM's positions after the prefix and the reply)."""
        positions = int(getattr(captioner.lm.config, "n_positions", 0) or captioner.lm.config.max_position_embeddings)
        room = positions - captioner.config.prefix_tokens
        limit = min(max_seq_len, room) if max_seq_len else room
        if limit < 16:
            raise UserError(f"chat.max_seq_len: the captioner's LM has {positions} positions, {room} after the "
                            f"{captioner.config.prefix_tokens} prefix tokens: too few for a conversation")
        config = dataclasses.replace(
            captioner.config, kind=cls.KIND, max_new_tokens=int(max_new_tokens), num_beams=1,
            max_prompt_tokens=limit,
            extra={"template": CHAT.record(), "from_captioner": str(captioner.model_dir or "")})
        lm = captioner.lm.requires_grad_(True)  # a captioner trained with a frozen LM: the chat model tunes it
        model = cls(lm, captioner.projector, captioner.tokenizer, config)
        model.model_dir = None
        return model

    @property
    def window(self) -> int:
        """Text tokens of a training window: the prompt budget the model answers in."""
        return int(self.config.max_prompt_tokens)

    def answer(self, feats: torch.Tensor, messages: Sequence[str],
               histories: Sequence[Sequence[tuple[str, str]]] | None = None) -> list[str]:
        """Greedy replies, one per row of ``feats`` [B, R, D]: ``messages[i]`` after the turns ``histories[i]``."""
        histories = histories if histories is not None else [()] * len(messages)
        # The reply must fit after the prompt within the LM's positions.
        limit = max(self.window - int(self.config.max_new_tokens), 8)
        prompts = [CHAT.encode_prompt(self.tokenizer, m, h, limit) for m, h in zip(messages, histories)]
        return [self.decode(ids) for ids in self.generate(feats, prompts)]

    def save_lm(self, d: Path) -> None:
        self.lm.save_pretrained(d / "lm", safe_serialization=True)

    @classmethod
    def load_lm(cls, d: Path, config: PrefixLMConfig, device: torch.device) -> nn.Module:
        from transformers import AutoModelForCausalLM

        if not (d / "lm" / "config.json").is_file():
            raise UserError(f"{d / 'lm'}: missing (the chat model's language model); {REBUILD}")
        lm = hub.load(AutoModelForCausalLM, d / "lm", "main", f"{d / CONFIG_NAME} lm_source", dtype=torch.float32)
        return lm.to(device)


def load_chat_model(directory: str | Path = "models/chat", device: str | torch.device = "cpu") -> ChatModel:
    """The saved chat model in one call (LM, tokenizer, projector, config), in eval mode."""
    return ChatModel.load(directory, device, rebuild=REBUILD)
