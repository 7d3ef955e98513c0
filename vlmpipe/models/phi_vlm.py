"""Visual question answering: SigLIP embedding → K prefix tokens → Phi (4-bit NF4 + LoRA).

The model
---------
- The base language model (``microsoft/phi-2``, or the tiny offline Phi built by
  ``vlmpipe.models.tiny_lm``) is loaded with ``from_pretrained`` in 4-bit NF4 with
  double quantization (bitsandbytes ``BitsAndBytesConfig``; fp32 compute on CPU,
  bf16 on CUDA) and frozen. ``load_in_4bit: false`` loads it in full precision
  instead, for comparison. ``prepare_model_for_kbit_training`` upcasts the
  remaining small parameters and (a param) switches on gradient checkpointing.
- LoRA adapters (peft: r, alpha, dropout, rsLoRA, target modules
  ``q_proj k_proj v_proj dense fc1 fc2``) are the only trainable LM weights.
- A ``PrefixProjector`` maps the 512-d SigLIP embedding of the image to K
  prefix vectors in the LM's hidden size. It is trained in full.

The conversation template (``TEMPLATE``, the only one)
-------------------------------------------------------
An image's Q/A pairs are one multi-turn conversation, the image first::

    [K image prefix vectors]
    Question: {q1}\\nAnswer: {a1}<eos>Question: {q2}\\nAnswer: {a2}<eos> ...

Each turn is tokenized piecewise — ``"Question: {q}\\nAnswer:"``, then
``" {a}"``, then the EOS id — and the pieces are concatenated, so the answer
tokens are known exactly. Labels (the loss) cover the answer tokens and the EOS
after each answer only; prefix, questions and padding are ``-100``. The EOS
teaches the model to stop, and at inference the prompt is the prefix, the
earlier turns in full, and ``"Question: {q}\\nAnswer:"``; greedy decoding runs
until EOS or ``max_new_tokens``.

Batches are padded on the right to the longest conversation in the batch
(dynamic padding), never to a fixed length.

Saved layout (``PhiVLM.save``; ``load_vlm(dir)`` returns a ready model)::

    vlm_config.json        base model, encoder identity, template, settings
    adapter/               the PEFT LoRA adapter (safetensors)
    projector.json/.safetensors
    tokenizer/
    base/                  the tiny base model, copied in (offline default only),
                           so the directory is self-contained
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from vlmpipe.errors import UserError
from vlmpipe.io import read_image, read_json, read_json_file, write_json
from vlmpipe.models.projector import PrefixProjector

log = logging.getLogger(__name__)

FORMAT = "vlmpipe-phi-vlm/1"
CONFIG_NAME = "vlm_config.json"
IGNORE_INDEX = -100

#: The one conversation template (recorded in the saved config).
TEMPLATE = {
    "name": "qa-v1",
    "image": "K prefix vectors from the projector, before any text",
    "question": "Question: {question}\nAnswer:",
    "answer": " {answer}",
    "turn_end": "<eos>",
    "labels": "answer tokens + the EOS after each answer",
}


# ------------------------------------------------------------------ template

def question_text(question: str) -> str:
    return TEMPLATE["question"].format(question=" ".join(str(question).split()))


def answer_text(answer: str) -> str:
    return TEMPLATE["answer"].format(answer=" ".join(str(answer).split()))


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_conversation(tokenizer, turns: Sequence[tuple[str, str]],
                        max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation (without the image prefix).

    Labels are the ids on answer tokens and each answer's EOS, ``-100`` elsewhere.
    Whole turns that would exceed ``max_tokens`` are dropped (at least one turn
    is kept, cut to ``max_tokens``).
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    for q, a in turns:
        q_ids = _ids(tokenizer, question_text(q))
        a_ids = _ids(tokenizer, answer_text(a)) + [eos]
        if max_tokens is not None and ids and len(ids) + len(q_ids) + len(a_ids) > max_tokens:
            break
        ids += q_ids + a_ids
        labels += [IGNORE_INDEX] * len(q_ids) + a_ids
    if max_tokens is not None:
        ids, labels = ids[:max_tokens], labels[:max_tokens]
    return ids, labels


def encode_prompt(tokenizer, question: str, history: Sequence[tuple[str, str]] = (),
                  max_tokens: int | None = None) -> list[int]:
    """Prompt ids for ``question`` after the earlier ``history`` turns (oldest dropped first if too long)."""
    eos = tokenizer.eos_token_id
    tail = _ids(tokenizer, question_text(question))
    turns = [_ids(tokenizer, question_text(q)) + _ids(tokenizer, answer_text(a)) + [eos] for q, a in history]
    while turns and max_tokens is not None and sum(map(len, turns)) + len(tail) > max_tokens:
        turns.pop(0)
    ids = [t for turn in turns for t in turn] + tail
    return ids[-max_tokens:] if max_tokens is not None else ids


def collate(examples: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of examples to the longest one (right padding).

    Each example: ``embedding`` (Tensor [R, D]), ``input_ids`` and ``labels``
    (equal-length int sequences). Returns ``embeddings`` float32 [B, R, D],
    ``input_ids`` / ``labels`` / ``attention_mask`` int64 [B, T].
    """
    if not examples:
        raise ValueError("collate: empty batch")
    longest = max(len(e["input_ids"]) for e in examples)
    b = len(examples)
    input_ids = torch.full((b, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((b, longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, longest), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(e["labels"], dtype=torch.long)
        mask[i, :n] = 1
    emb = torch.stack([torch.as_tensor(e["embedding"]).float() for e in examples])
    if emb.dim() == 2:
        emb = emb.unsqueeze(1)
    return {"embeddings": emb, "input_ids": input_ids, "attention_mask": mask, "labels": labels}


class QADataset(torch.utils.data.Dataset):
    """Conversations paired with cached image embeddings, tokenized once up front.

    ``embeddings``: Tensor [N, R, D]; ``conversations[i]``: the (question, answer)
    turns of image ``i``. Also keeps the raw turns for evaluation.
    """

    def __init__(self, tokenizer, embeddings: torch.Tensor, conversations: Sequence[Sequence[tuple[str, str]]],
                 max_tokens: int | None = None) -> None:
        if len(embeddings) != len(conversations):
            raise ValueError(f"{len(embeddings)} embeddings but {len(conversations)} conversations")
        self.embeddings = embeddings
        self.conversations = [list(c) for c in conversations]
        self.encoded = [encode_conversation(tokenizer, c, max_tokens) for c in self.conversations]
        dropped = sum(len(c) - sum(1 for t in lab if t == tokenizer.eos_token_id)
                      for c, (_, lab) in zip(self.conversations, self.encoded))
        if dropped > 0:
            log.warning("%d Q/A turns did not fit in %s tokens and were dropped", dropped, max_tokens)

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids, labels = self.encoded[i]
        return {"embedding": self.embeddings[i], "input_ids": ids, "labels": labels}


# ------------------------------------------------------------------ loading

def check_attn_implementation(name: str, device: torch.device) -> str:
    if name == "flash_attention_2":
        if device.type != "cuda":
            raise UserError("phi2.attn_implementation: flash_attention_2 needs a CUDA device "
                            "(use 'sdpa' on CPU)")
        if importlib.util.find_spec("flash_attn") is None:
            raise UserError("phi2.attn_implementation: flash_attention_2 needs the flash-attn package "
                            "(pip install flash-attn), or use 'sdpa'")
    return name


def load_base(base: str | os.PathLike, load_in_4bit: bool, attn_implementation: str, device: torch.device, *,
              revision: str = "main", compute_dtype: torch.dtype = torch.float32, key: str = "phi2.base_model"):
    """``from_pretrained`` the base LM (a hub id at ``revision``, or a folder): 4-bit NF4 + double
    quantization computing in ``compute_dtype`` (bf16 on CUDA), or full precision."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from vlmpipe import hub

    check_attn_implementation(attn_implementation, device)
    kwargs: dict[str, Any] = dict(attn_implementation=attn_implementation, dtype=torch.float32)
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    with warnings.catch_warnings():  # transformers 5 deprecation noise from peft/bnb helpers
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*gradient_checkpointing.*")
        model = hub.load(AutoModelForCausalLM, base, revision, key, **kwargs)
    if not load_in_4bit:
        model.to(device)
    return model


def disable_4bit_repacking(model: nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer of ``model`` on its one (training) path; return how many there are.

    bitsandbytes 0.50.2, on a CPU with AVX512-BF16, repacks a ``Linear4bit`` weight into a CPU
    inference layout on its first eval-mode forward without gradients (the per-epoch evaluation
    is one) and never packs it back. The next training step then takes the inference kernel,
    whose in-place bias add fails under autograd ("a view of a leaf Variable that requires grad
    is being used in an in-place operation"); and the repacking itself fails for layers narrower
    than the quantization block (64), as in small test models. A CPU without the feature never
    repacks, so both failures depend on the machine. Every 4-bit model here, built to train or
    loaded to answer, switches the repacking off (and undoes it if it already happened): one code
    path and the same numbers on every CPU.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    from bitsandbytes.nn import Linear4bit

    n = 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            m.support_avx512bf16_for_cpu = False
            state = m.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):
                m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu_inverse(m.weight.data, state)
            n += 1
    return n


def load_tokenizer(path: str | os.PathLike, revision: str = "main", key: str = "phi2.base_model"):
    from transformers import AutoTokenizer

    from vlmpipe import hub

    tok = hub.load(AutoTokenizer, path, revision, key)
    if tok.eos_token_id is None:
        raise UserError(f"{key}: the tokenizer of {path} has no EOS token")
    if tok.pad_token_id is None:  # Phi-2's tokenizer has none; padding is masked anyway
        tok.pad_token = tok.eos_token
    return tok


# ------------------------------------------------------------------ the model

class PhiVLM(nn.Module):
    """The QA model: ``lm`` (PEFT-wrapped base), ``projector``, ``tokenizer``, ``info`` (config)."""

    def __init__(self, lm: nn.Module, projector: PrefixProjector, tokenizer, info: dict) -> None:
        super().__init__()
        self.lm = lm
        self.projector = projector
        self.tokenizer = tokenizer
        self.info = info

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    @property
    def max_tokens(self) -> int:
        return int(self.info["max_seq_len"])

    @property
    def collate_fn(self):
        return functools.partial(collate, pad_token_id=self.tokenizer.pad_token_id)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(input_ids)

    def _lm_forward(self, batch: Mapping[str, torch.Tensor], with_labels: bool):
        dev = self.device
        ids = batch["input_ids"].to(dev)
        mask = batch["attention_mask"].to(dev)
        prefix = self.projector(batch["embeddings"].to(dev, torch.float32))
        tok = self._embed(ids)
        b, k = prefix.shape[:2]
        kwargs = {}
        if with_labels:
            labels = batch["labels"].to(dev)
            kwargs["labels"] = torch.cat([labels.new_full((b, k), IGNORE_INDEX), labels], dim=1)
        out = self.lm(inputs_embeds=torch.cat([prefix.to(tok.dtype), tok], dim=1),
                      attention_mask=torch.cat([mask.new_ones(b, k), mask], dim=1), use_cache=False, **kwargs)
        return out, k

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Mean loss over the answer + EOS tokens; ``tokens`` counts non-padding text tokens."""
        out, _ = self._lm_forward(batch, with_labels=True)
        return {"loss": out.loss, "samples": int(batch["input_ids"].shape[0]),
                "tokens": int(batch["attention_mask"].sum())}

    @torch.no_grad()
    def loss_stats(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Summed loss, labelled-token count, and answers whose every token (EOS too) is the argmax.

        The last is teacher-forced exact match: it equals greedy-decoding exact
        match before normalisation (greedy output is the answer iff each answer
        token is the argmax given the ones before it).
        """
        out, k = self._lm_forward(batch, with_labels=False)
        logits = out.logits[:, k:-1].float()
        labels = batch["labels"].to(logits.device)[:, 1:]
        valid = labels != IGNORE_INDEX
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
        right = (logits.argmax(-1) == labels) | ~valid
        # An answer is a maximal run of labelled positions; a run ends at each EOS.
        eos = (labels == self.tokenizer.eos_token_id) & valid
        # Position p belongs to answer j = the number of answer EOS tokens strictly before it.
        ans_id = torch.cumsum(eos.long(), dim=1) - eos.long()
        b, t = labels.shape
        wrong = torch.zeros(b, t + 1, dtype=torch.long, device=labels.device)
        wrong.scatter_add_(1, ans_id, (~right).long())
        n_ans = eos.sum(1, keepdim=True)  # a truncated last answer without its EOS is not counted
        answers_right = int(((wrong[:, :t] == 0) & (torch.arange(t, device=labels.device) < n_ans)).sum())
        n_answers = int(n_ans.sum())
        return {"nll_sum": float((nll * valid).sum()), "label_tokens": int(valid.sum()),
                "answers": n_answers, "answers_right": answers_right}

    @torch.no_grad()
    def generate(self, embeddings: torch.Tensor, prompts: Sequence[Sequence[int]],
                 max_new_tokens: int | None = None) -> list[list[int]]:
        """Greedy decoding for a batch of prompts (left-padded); returns new ids without EOS."""
        was_training = self.training
        self.eval()
        try:
            return self._generate(embeddings, prompts, max_new_tokens or int(self.info["max_new_tokens"]))
        finally:
            self.train(was_training)

    def _generate(self, embeddings, prompts, max_new_tokens):
        dev = self.device
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        emb = torch.as_tensor(embeddings).to(dev, torch.float32)
        if emb.dim() == 2:
            emb = emb.unsqueeze(1)
        prefix = self.projector(emb)
        b, k, h = prefix.shape
        lens = [len(p) for p in prompts]
        total = k + max(lens)
        ids = torch.full((b, max(lens)), pad, dtype=torch.long, device=dev)
        mask = torch.zeros((b, total), dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            ids[i, max(lens) - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        tok = self._embed(ids)
        # Left padding: [pad ... pad][prefix][prompt]; positions count real tokens only.
        embeds = torch.zeros((b, total, h), dtype=tok.dtype, device=dev)
        for i, n in enumerate(lens):
            start = total - k - n
            embeds[i, start:start + k] = prefix[i].to(tok.dtype)
            embeds[i, start + k:] = tok[i, max(lens) - n:]
            mask[i, start:] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True)
        last_pos = pos[:, -1]
        generated: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        for step in range(max_new_tokens):
            nxt = out.logits[:, -1].float().argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    if t == eos:
                        done[i] = True
                    else:
                        generated[i].append(t)
            if all(done) or step == max_new_tokens - 1:
                break
            # Finished rows keep decoding garbage that is never read (no ragged batches).
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            last_pos = last_pos + 1
            out = self.lm(input_ids=nxt[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                          past_key_values=out.past_key_values, use_cache=True)
        return generated

    def save(self, directory: str | os.PathLike) -> None:
        """Adapter, projector, tokenizer, config (+ the tiny base, copied in)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        info = dict(self.info)
        src = info.pop("base_path", None)
        info.pop("model_dir", None)
        if info.get("base_in_dir"):
            shutil.copytree(src, d / "base")
            info["base_model"] = "base"
        # Save with the real base path (peft looks the base up while saving), then make the config
        # portable: its base under the name load_vlm uses, not the temporary directory the tiny base
        # was built in, and target_modules sorted (peft keeps a set: string-hash order per process).
        # peft's model card names that directory too: a plain card replaces it. Equal models now
        # save to equal bytes, which DVC's output hashes rely on.
        # save_embedding_layers=False: the adapter never trains embeddings (and peft would look the
        # base config up on the hub to find out).
        self.lm.save_pretrained(str(d / "adapter"), safe_serialization=True, save_embedding_layers=False)
        acfg = d / "adapter" / "adapter_config.json"
        a = read_json(acfg)
        a["base_model_name_or_path"] = info["base_model"]
        if isinstance(a.get("target_modules"), list):
            a["target_modules"] = sorted(a["target_modules"])
        write_json(acfg, a)
        (d / "adapter" / "README.md").write_text(
            f"LoRA adapter of a vlmpipe visual QA model on `{info['base_model']}`.\n"
            "Load the whole model (base, adapter, projector) with `vlmpipe.models.phi_vlm.load_vlm`.\n")
        self.projector.save(d)
        self.tokenizer.save_pretrained(str(d / "tokenizer"))
        write_json(d / CONFIG_NAME, info)


def trainable_counts(model: PhiVLM) -> dict[str, int]:
    """Trainable parameters of the LoRA adapters and of the projector."""
    lm = sum(q.numel() for q in model.lm.parameters() if q.requires_grad)
    return {"lora_params": lm, "projector_params": sum(q.numel() for q in model.projector.parameters())}


def _lora_config(p) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout,
                      use_rslora=p.use_rslora, target_modules=list(p.target_modules),
                      bias="none", task_type="CAUSAL_LM")


def build_vlm(p, base: str | os.PathLike, device: torch.device | str = "cpu", *,
              encoder: Mapping[str, Any] | None = None, siglip_dir: str | os.PathLike | None = None,
              embed_dim: int = 512, regions: int = 1, seed: int = 0) -> PhiVLM:
    """A trainable QA model from ``Phi2Params`` ``p`` and a base (a directory or hub id).

    ``base`` is the tiny base directory when ``p.base_model == "tiny"``; it is
    copied into the saved model. ``encoder`` (identity of the image encoder that
    produced the embeddings) and ``siglip_dir`` are recorded in the config so
    ``ask_file`` can encode new images the same way.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    from vlmpipe import hub
    from vlmpipe.runtime import resolve_precision

    device = torch.device(device)
    revision = "main" if p.base_model == "tiny" else p.revision
    if p.base_model != "tiny":
        hub.warn_unpinned(p.base_model, revision, "phi2.revision")
    lm = load_base(base, p.load_in_4bit, p.attn_implementation, device, revision=revision,
                   compute_dtype=resolve_precision(p.train.precision, device))
    max_pos = getattr(lm.config, "max_position_embeddings", None)
    if max_pos and p.prefix_tokens + p.max_seq_len + p.max_new_tokens > max_pos:
        raise UserError(f"phi2.max_seq_len: prefix_tokens + max_seq_len + max_new_tokens "
                        f"({p.prefix_tokens}+{p.max_seq_len}+{p.max_new_tokens}) exceeds the base "
                        f"model's {max_pos} positions")
    # An unknown target module would surface as a peft traceback; name the choices instead.
    linears = sorted({n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, nn.Linear)})
    unknown = [t for t in p.target_modules if t not in linears]
    if unknown:
        raise UserError(f"phi2.target_modules: {p.base_model} has no linear layer named {unknown[0]!r} "
                        f"(it has: {', '.join(linears)})")
    gc_kwargs = {"use_reentrant": False}
    with warnings.catch_warnings():  # transformers 5 renames gradient checkpointing; peft still calls the old names
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*gradient_checkpointing.*")
        if p.load_in_4bit:
            lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=p.gradient_checkpointing,
                                                 gradient_checkpointing_kwargs=gc_kwargs)
        else:
            for prm in lm.parameters():
                prm.requires_grad_(False)
            if p.gradient_checkpointing:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        torch.manual_seed(seed)
        lm = get_peft_model(lm, _lora_config(p))
    if p.load_in_4bit:
        disable_4bit_repacking(lm)
    commit = None if p.base_model == "tiny" else hub.resolved_commit(base, revision)
    tokenizer = load_tokenizer(base, commit or revision)
    hidden = lm.get_input_embeddings().weight.shape[1]
    projector = PrefixProjector(embed_dim, regions, p.prefix_tokens, hidden, p.projector_hidden or None).to(device)
    base_in_dir = p.base_model == "tiny"
    info = {
        "format": FORMAT,
        "base_model": "base" if base_in_dir else str(p.base_model),
        # The exact hub commit the adapter was trained on; load_vlm loads that one again.
        "base_revision": None if base_in_dir or hub.is_local(p.base_model) else (commit or revision),
        "base_in_dir": base_in_dir,
        "base_path": str(base),
        "load_in_4bit": p.load_in_4bit,
        "attn_implementation": p.attn_implementation,
        "prefix_tokens": p.prefix_tokens,
        "max_seq_len": p.max_seq_len,
        "max_new_tokens": p.max_new_tokens,
        "lora": {"r": p.lora_r, "alpha": p.lora_alpha, "dropout": p.lora_dropout,
                 "use_rslora": p.use_rslora, "target_modules": list(p.target_modules)},
        "template": TEMPLATE,
        "encoder": dict(encoder or {}),
        "siglip_dir": str(siglip_dir) if siglip_dir is not None else None,
        "embed_dim": embed_dim,
        "regions": regions,
    }
    return PhiVLM(lm, projector, tokenizer, info)


def load_vlm(directory: str | os.PathLike = "models/phi2_vlm", device: str | torch.device = "auto") -> PhiVLM:
    """Load a saved QA model in one call: base (4-bit as trained) + adapter + projector, in eval mode."""
    from peft import PeftModel

    from vlmpipe.runtime import resolve_device, resolve_precision

    d = Path(directory)
    cfg_path = d / CONFIG_NAME
    rebuild = "run `dvc repro train_phi2_qlora` (or `dvc checkout models/phi2_vlm`)"
    if not cfg_path.exists():
        raise UserError(f"{d}: no trained QA model here ({CONFIG_NAME} missing; {rebuild})")
    info = read_json_file(cfg_path, rebuild)
    if info.get("format") != FORMAT:
        raise UserError(f"{cfg_path}: unsupported format {info.get('format')!r} (expected {FORMAT})")
    need = [k for k in ("base_model", "load_in_4bit", "attn_implementation", "max_seq_len", "max_new_tokens")
            if k not in info]
    if need:
        raise UserError(f"{cfg_path}: incomplete config (no {need[0]}); {rebuild}")
    for part, what in (("adapter/adapter_config.json", "LoRA adapter"), ("tokenizer", "tokenizer")):
        if not (d / part).exists():
            raise UserError(f"{d / part.split('/')[0]}: missing or incomplete {what}; {rebuild}")
    dev = resolve_device(device) if isinstance(device, str) else device
    base = d / info["base_model"] if info.get("base_in_dir") else info["base_model"]
    # A hub base is loaded at the very commit the adapter was trained on, never whatever the hub serves today.
    revision = info.get("base_revision") or "main"
    key = f"{cfg_path} base_model"
    lm = load_base(base, info["load_in_4bit"], info["attn_implementation"], dev, revision=revision,
                   compute_dtype=resolve_precision("auto", dev), key=key)
    projector = PrefixProjector.load(d).to(dev)
    width = lm.get_input_embeddings().weight.shape[1]
    if projector.hidden_size != width:  # checked before peft meets the adapter's shapes
        raise UserError(f"{key}: {base}@{revision} has hidden size {width}, but the projector was trained for "
                        f"{projector.hidden_size}: not the base this model was trained on")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*gradient_checkpointing.*")
        try:
            lm = PeftModel.from_pretrained(lm, str(d / "adapter"), is_trainable=False)
        except Exception as e:  # noqa: BLE001 - truncated weights, corrupt JSON, shapes: all a damaged folder
            raise UserError(f"{d / 'adapter'}: cannot load the LoRA adapter ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:160]}); {rebuild}") from None
    if info["load_in_4bit"]:
        disable_4bit_repacking(lm)
    tokenizer = load_tokenizer(d / "tokenizer", key=key)
    info["model_dir"] = str(d)
    info["base_path"] = str(base)  # so that a loaded model can be saved again, self-contained
    model = PhiVLM(lm, projector, tokenizer, info)
    model.eval()
    return model


# ------------------------------------------------------------------ use

def answer_batch(model: PhiVLM, embeddings: torch.Tensor, questions: Sequence[str],
                 histories: Sequence[Sequence[tuple[str, str]]] | None = None,
                 max_new_tokens: int | None = None) -> list[str]:
    """Greedy answers for a batch: ``embeddings`` [B, R, D] (or [B, D]), one question each."""
    histories = histories if histories is not None else [()] * len(questions)
    prompts = [encode_prompt(model.tokenizer, q, h, model.max_tokens) for q, h in zip(questions, histories)]
    out = model.generate(embeddings, prompts, max_new_tokens)
    return [model.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in out]


def answer(model: PhiVLM, embedding: torch.Tensor, question: str,
           history: Iterable[tuple[str, str]] = (), max_new_tokens: int | None = None) -> str:
    """Greedy (deterministic) answer to ``question`` about the image with this SigLIP ``embedding``.

    ``embedding``: [D], [R, D] or [1, R, D]. ``history``: earlier (question, answer) turns.
    """
    emb = torch.as_tensor(embedding)
    while emb.dim() < 3:
        emb = emb.unsqueeze(0)
    return answer_batch(model, emb[:1], [question], [list(history)], max_new_tokens)[0]


def conversation_text(turns: Sequence[tuple[str, str]], eos_token: str) -> str:
    """A conversation in the template, as plain text (the tiny base's LM warm-up reads these)."""
    return "".join(question_text(q) + answer_text(a) + eos_token for q, a in turns)


def frame_conversations(df, split: str) -> tuple[list[int], list[list[tuple[str, str]]], list[list[str]]]:
    """(Dataset_Index per row, its (question, answer) turns, their question types) for one split of the Q/A CSV."""
    from vlmpipe.data.qa import A_COLS, Q_COLS, T_COLS

    rows = df[df["Split"] == split] if "Split" in df.columns else df
    idx, convs, types = [], [], []
    for r in rows.to_dict("records"):
        turns = [(str(r[q]), str(r[a])) for q, a in zip(Q_COLS, A_COLS) if r.get(q)]
        idx.append(int(r["Dataset_Index"]))
        convs.append(turns)
        types.append([str(r.get(t) or "unknown") for q, t in zip(Q_COLS, T_COLS) if r.get(q)])
    return idx, convs, types


@torch.no_grad()
def evaluate_qa(model: PhiVLM, data: QADataset, batch_size: int = 64,
                questions: Sequence[tuple[int, int]] = ()) -> dict[str, float]:
    """Held-out metrics: ``val_loss`` (mean NLL per answer/EOS token over all of ``data``),
    ``val_answer_acc`` (teacher-forced: every token of the answer and its EOS is the argmax),
    and, when ``questions`` ((conversation, turn) pairs) are given, ``exact_match``: greedy
    answers with the gold earlier turns as history, normalised (lower-case, no punctuation or
    articles) and compared with the truth.
    """
    from vlmpipe.evaluation import normalize_answer

    tot = {"nll_sum": 0.0, "label_tokens": 0, "answers": 0, "answers_right": 0}
    collate_fn = model.collate_fn
    for s in range(0, len(data), batch_size):
        st = model.loss_stats(collate_fn([data[i] for i in range(s, min(s + batch_size, len(data)))]))
        for k in tot:
            tot[k] += st[k]
    out = {"val_loss": tot["nll_sum"] / max(tot["label_tokens"], 1),
           "val_answer_acc": tot["answers_right"] / max(tot["answers"], 1)}
    if questions:
        preds = predict_turns(model, data, questions, batch_size)
        truth = [data.conversations[i][j][1] for i, j in questions]
        out["exact_match"] = sum(normalize_answer(p) == normalize_answer(t) for p, t in zip(preds, truth)) / len(truth)
    return out


def predict_turns(model: PhiVLM, data: QADataset, questions: Sequence[tuple[int, int]],
                  batch_size: int = 64) -> list[str]:
    """Greedy answers to turn ``j`` of conversation ``i`` for each (i, j), the gold turns before it as history."""
    preds: list[str] = []
    for s in range(0, len(questions), batch_size):
        chunk = questions[s:s + batch_size]
        emb = torch.stack([torch.as_tensor(data.embeddings[i]) for i, _ in chunk])
        preds += answer_batch(model, emb, [data.conversations[i][j][0] for i, j in chunk],
                              [data.conversations[i][:j] for i, j in chunk])
    return preds


def eval_questions(data: QADataset, max_questions: int, seed: int = 0) -> list[tuple[int, int]]:
    """A fixed subset of held-out (conversation, turn) pairs: whole conversations of randomly chosen images."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    out: list[tuple[int, int]] = []
    for i in order:
        if len(out) >= max_questions:
            break
        out += [(i, j) for j in range(len(data.conversations[i]))]
    return out[:max_questions]


def siglip_dir_of(model: PhiVLM) -> Path:
    """Where the SigLIP tower that made the training embeddings lives (recorded relative to the model)."""
    rel = model.info.get("siglip_dir")
    if not rel:
        raise UserError(f"{model.info.get('model_dir')}: the model config records no SigLIP directory")
    p = Path(rel)
    return p if p.is_absolute() else Path(model.info["model_dir"]) / p


def ask_file(model_dir: str | os.PathLike, image_path: str | os.PathLike, question: str,
             history: Iterable[tuple[str, str]] = (), device: str = "auto") -> str:
    """Answer ``question`` about an image file, encoding it with the trained SigLIP tower."""
    from vlmpipe.embeddings import siglip_identity
    from vlmpipe.models.siglip import load_siglip

    from transformers.utils import logging as hf_logging

    image = read_image(image_path)  # fail on a bad image before loading any model
    hf_logging.disable_progress_bar()  # a command-line answer, not a loading bar
    model = load_vlm(model_dir, device)
    sdir = siglip_dir_of(model)
    ident = siglip_identity(sdir)  # a UserError naming sdir when it is missing
    want = model.info.get("encoder") or {}
    if want and (ident["name"], ident["hash"]) != (want.get("name"), want.get("hash")):
        raise UserError(f"{sdir}: SigLIP weights {ident['hash']} differ from the ones {model_dir} was trained on "
                        f"({want.get('hash')}); retrain the QA model (`dvc repro`)")
    emb = encode_image(load_siglip(sdir, model.device), image, model)
    return answer(model, emb, question, list(history))


def encode_image(tower, image, model: PhiVLM) -> torch.Tensor:
    """One image → its SigLIP embedding [1, R, D], preprocessed exactly as the cached ones were."""
    from vlmpipe.embeddings import siglip_encoder

    with torch.no_grad():
        return siglip_encoder(tower, int(model.info.get("regions", 1)))([image]).float()




# ------------------------------------------------------------------ training (the stage's body)

def load_split_embeddings(embeddings_root: str | os.PathLike, split: str, indices: Sequence[int],
                          csv_path: str | os.PathLike, encoder: Mapping[str, str]) -> torch.Tensor:
    """Cached embeddings [N, R, D] of the CSV rows' images (by ``Dataset_Index``), made by ``encoder``."""
    from vlmpipe import embeddings

    cache = embeddings.load(embeddings_root, "cifar", split, expect_encoder=dict(encoder))
    emb = torch.as_tensor(cache.embeddings)
    if emb.dim() == 2:
        emb = emb.unsqueeze(1)
    pos = {int(i): n for n, i in enumerate(torch.as_tensor(cache.ids).tolist())}
    missing = [i for i in indices if i not in pos]
    if missing:
        raise UserError(f"{csv_path}: {len(missing)} {split} rows have no cached embedding in "
                        f"{embeddings_root}/cifar_{split} (e.g. Dataset_Index {missing[0]}); "
                        "rerun `dvc repro precompute_embeddings`")
    return emb[torch.as_tensor([pos[i] for i in indices], dtype=torch.long)]


def train_phi_vlm(p, *, seed: int, csv_path: str | os.PathLike, cifar_root: str | os.PathLike,
                  embeddings_root: str | os.PathLike, siglip_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  ckpt_dir: str | os.PathLike, report_dir: str | os.PathLike, run: Any = None) -> dict:
    """Train the QA model from the Q/A CSV and the cached embeddings; write ``out_dir`` atomically.

    ``p`` is ``Phi2Params``. For ``base_model: tiny`` the base is built first
    (tokenizer trained on the training conversations, seeded LM warm-up on them:
    deterministic, so a resumed run rebuilds the same base). Returns the final
    metrics (also in ``report_dir/metrics.json``), next to the blind baseline.
    """
    from vlmpipe.data.qa import read_qa_csv
    from vlmpipe.embeddings import siglip_identity
    from vlmpipe.evaluation import BlindBaseline, normalize_answer, vqa_accuracy
    from vlmpipe.io import atomic_path, scratch_dir
    from vlmpipe.models.tiny_lm import build_tiny_lm
    from vlmpipe.params import to_dict
    from vlmpipe.runtime import resolve_device
    from vlmpipe.text import EOS
    from vlmpipe.train import TrainTask, fingerprint, fit, is_main_process

    df = read_qa_csv(csv_path, cifar_root)
    tr_idx, tr_convs, tr_types = frame_conversations(df, "train")
    te_idx, te_convs, te_types = frame_conversations(df, "test")
    if not tr_convs or not te_convs:
        raise UserError(f"{csv_path}: needs rows of both splits (train: {len(tr_convs)}, test: {len(te_convs)})")
    # The cache must come from the trained SigLIP that ``ask`` will encode new images with.
    encoder = siglip_identity(siglip_dir)
    tr_emb = load_split_embeddings(embeddings_root, "train", tr_idx, csv_path, encoder)
    te_emb = load_split_embeddings(embeddings_root, "test", te_idx, csv_path, encoder)
    device = resolve_device(p.train.device, "phi2.train.device")
    rel_siglip = os.path.relpath(Path(siglip_dir).resolve(), Path(out_dir).resolve())

    with scratch_dir(ckpt_dir, "tiny-base") as tmp:  # a killed run's leftovers are removed next time
        base: str | Path = p.base_model
        if p.base_model == "tiny":
            texts = [conversation_text(c, EOS)[: -len(EOS)] for c in tr_convs]  # build_tiny_lm appends EOS
            base = build_tiny_lm("phi", p.tiny, texts, Path(tmp) / "tiny_phi", seed)
        model = build_vlm(p, base, device, encoder=encoder, siglip_dir=rel_siglip,
                          embed_dim=int(tr_emb.shape[-1]), regions=int(tr_emb.shape[1]), seed=seed)
        train = QADataset(model.tokenizer, tr_emb, tr_convs, p.max_seq_len)
        val = QADataset(model.tokenizer, te_emb, te_convs, p.max_seq_len)
        questions = eval_questions(val, p.eval_questions, seed)
        counts = trainable_counts(model)
        log.info("phi2_vlm: %d train / %d held-out conversations, %d Q/A turns; trainable: %.2fM LoRA + %.2fM "
                 "projector, base %s in %s", len(train), len(val), sum(map(len, tr_convs)), counts["lora_params"] / 1e6,
                 counts["projector_params"] / 1e6,
                 p.base_model, "4-bit NF4" if p.load_in_4bit else "full precision")

        def evaluate(m: PhiVLM, epoch: int) -> dict[str, float]:
            return evaluate_qa(m, val, batch_size=64, questions=questions)

        task = TrainTask("phi2_vlm", model, train, model.collate_fn, evaluate=evaluate, optimizer="paged_adamw")
        cifar_emb = sorted(Path(embeddings_root).glob("cifar_*"))  # not the COCO files: the captioner's params
        identity = {"phi2": to_dict(p), "data": fingerprint(csv_path, *cifar_emb)}
        res = fit(task, p.train, seed=seed, ckpt_dir=Path(ckpt_dir), report_dir=Path(report_dir),
                  identity=identity, run=run)
        if not is_main_process():
            return res.metrics
        with atomic_path(out_dir) as out:
            model.save(out)

    # Final held-out scores next to the blind baseline, on the same questions.
    metrics: dict[str, Any] = {**res.metrics, **counts}
    blind = BlindBaseline((q, a, t) for c, ts in zip(tr_convs, tr_types) for (q, a), t in zip(c, ts))
    truth = [(te_convs[i][j][0], te_convs[i][j][1], te_types[i][j]) for i, j in questions]
    if questions:
        preds = predict_turns(model, val, questions)
        acc = vqa_accuracy([(pr, a, t) for pr, (_, a, t) in zip(preds, truth)])
        metrics["exact_match"] = acc["accuracy"]
        metrics["exact_match_by_type"] = acc["by_type"]
        metrics["blind_exact_match"] = sum(normalize_answer(blind(q, t)) == normalize_answer(a)
                                           for q, a, t in truth) / len(truth)
        metrics["eval_questions"] = len(questions)
    report = Path(report_dir) / "metrics.json"
    summary = {**(read_json(report) if report.exists() else {}), **metrics}
    write_json(report, summary)
    if run is not None:
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        run.log_artifact(report)
    return summary
