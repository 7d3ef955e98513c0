"""The visual QA model: a prefix LM on Phi-2 (or the tiny offline Phi) in 4-bit NF4 with LoRA.

- The base is loaded with ``from_pretrained`` in 4-bit NF4 with double quantization
  (bitsandbytes; the compute dtype follows ``phi2.train.precision``: bf16 on CUDA, fp32 on a
  CPU) and frozen; ``load_in_4bit: false`` loads it in full precision, for comparison.
  ``prepare_model_for_kbit_training`` upcasts the remaining small parameters and (a param)
  switches on gradient checkpointing. LoRA adapters (r, alpha, dropout, rsLoRA, target
  modules) are the only trainable LM weights; the projector trains in full.
- It answers a question (``answer``) greedily, the earlier turns of the conversation as the
  prompt's history (``vlmpipe.models.lm.templates.QA``).
- Saved: the PEFT adapter in ``adapter/`` (byte-stable: equal models save equal bytes, as DVC's
  hashes need), and for the offline default the tiny base itself in ``lm/``; a hub base is
  referenced by id and commit and loaded at that commit again.
"""
from __future__ import annotations

import importlib.util
import shutil
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from vlmpipe.core import hub
from vlmpipe.models.lm.templates import PromptTemplate
from vlmpipe.core.errors import UserError
from vlmpipe.core.io import read_json, write_json
from vlmpipe.models.lm.prefix_lm import CONFIG_NAME, PrefixLM, PrefixLMConfig
from vlmpipe.models.lm.projector import PrefixProjector
from vlmpipe.core.runtime import resolve_precision

REBUILD = "run `dvc repro train_phi2_qlora` (or `dvc checkout models/phi2_vlm`)"

# The prompt template this model is trained and asked in (recorded in the saved model).
QA = PromptTemplate("qa-v1", "Question: {}\nAnswer:", " {}", "answer tokens + the EOS after each answer",
                    keys=("question", "answer"), slots=("question", "answer"))



def check_attn_implementation(name: str, device: torch.device) -> str:
    if name == "flash_attention_2":
        if device.type != "cuda":
            raise UserError("phi2.attn_implementation: flash_attention_2 needs a CUDA device (use 'sdpa' on CPU)")
        if importlib.util.find_spec("flash_attn") is None:
            raise UserError("phi2.attn_implementation: flash_attention_2 needs the flash-attn package "
                            "(pip install flash-attn), or use 'sdpa'")
    return name


def load_base(base: str | Path, load_in_4bit: bool, attn_implementation: str, device: torch.device, *,
              revision: str = "main", compute_dtype: torch.dtype = torch.float32, key: str = "phi2.base_model"):
    """``from_pretrained`` the base LM (a hub id at ``revision``, or a folder): 4-bit NF4 + double
    quantization computing in ``compute_dtype``, or full precision."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    check_attn_implementation(attn_implementation, device)
    kwargs: dict[str, Any] = dict(attn_implementation=attn_implementation, dtype=torch.float32)
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    with warnings.catch_warnings():  # transformers 5 deprecation noise from peft/bnb helpers
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*gradient_checkpointing.*")
        model = hub.load(AutoModelForCausalLM, base, revision, key, **kwargs)
    return model if load_in_4bit else model.to(device)


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
    path and the same numbers on every CPU (measured: no speed lost in answering).
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


def load_tokenizer(path: str | Path, revision: str = "main", key: str = "phi2.base_model"):
    from transformers import AutoTokenizer

    tok = hub.load(AutoTokenizer, path, revision, key)
    if tok.eos_token_id is None:
        raise UserError(f"{key}: the tokenizer of {path} has no EOS token")
    if tok.pad_token_id is None:  # Phi-2's tokenizer has none; padding is masked anyway
        tok.pad_token = tok.eos_token
    return tok


class QAModel(PrefixLM):
    KIND, TITLE = "qa", "QA model"
    base_path: Path | None = None  # where a tiny base lives (copied into the saved folder)

    def answer(self, feats: torch.Tensor, questions: Sequence[str],
               histories: Sequence[Sequence[tuple[str, str]]] | None = None) -> list[str]:
        """Greedy answers, one per row of ``feats`` [B, R, D]: ``questions[i]`` after the turns ``histories[i]``."""
        histories = histories if histories is not None else [()] * len(questions)
        limit = self.config.max_prompt_tokens
        prompts = [QA.encode_prompt(self.tokenizer, q, h, limit) for q, h in zip(questions, histories)]
        return [self.decode(ids) for ids in self.generate(feats, prompts)]

    def trainable_counts(self) -> dict[str, int]:
        """Trainable parameters of the LoRA adapters and of the projector."""
        return {"lora_params": sum(q.numel() for q in self.lm.parameters() if q.requires_grad),
                "projector_params": sum(q.numel() for q in self.projector.parameters())}

    def save_lm(self, d: Path) -> None:
        tiny = self.config.lm_source == "tiny"
        if tiny:
            shutil.copytree(self.base_path or (self.model_dir / "lm"), d / "lm")
        # save_embedding_layers=False: the adapter never trains embeddings (and peft would look the base
        # config up on the hub to find out).
        self.lm.save_pretrained(str(d / "adapter"), safe_serialization=True, save_embedding_layers=False)
        # Make the adapter config portable: its base under the name load uses, not the temporary folder the
        # tiny base was built in; target_modules sorted (peft keeps a set: string-hash order per process).
        # Equal models then save to equal bytes, which DVC's output hashes rely on.
        acfg = d / "adapter" / "adapter_config.json"
        a = read_json(acfg)
        a["base_model_name_or_path"] = "lm" if tiny else self.config.lm_source
        if isinstance(a.get("target_modules"), list):
            a["target_modules"] = sorted(a["target_modules"])
        write_json(acfg, a)
        (d / "adapter" / "README.md").write_text(
            f"LoRA adapter of a vlmpipe visual QA model on `{self.config.lm_source}`.\n"
            "Load the whole model (base, adapter, projector) with `vlmpipe.models.qa_model.load_qa_model`.\n")

    @classmethod
    def load_lm(cls, d: Path, config: PrefixLMConfig, device: torch.device) -> nn.Module:
        from peft import PeftModel

        x = config.extra
        if x.get("merged"):  # an export (`python -m vlmpipe export`): the LoRA merged into the base, whole in lm/
            if not (d / "lm" / "config.json").is_file():
                raise UserError(f"{d / 'lm'}: missing (the merged language model); export the model again")
            return load_base(d / "lm", False, x["attn_implementation"], device, key=f"{d / CONFIG_NAME} lm")
        if not (d / "adapter" / "adapter_config.json").is_file():
            raise UserError(f"{d / 'adapter'}: missing or incomplete LoRA adapter; {REBUILD}")
        base = d / "lm" if config.lm_source == "tiny" else config.lm_source
        # A hub base is loaded at the very commit the adapter was trained on, never what the hub serves today.
        lm = load_base(base, x["load_in_4bit"], x["attn_implementation"], device, revision=config.lm_revision or "main",
                       compute_dtype=resolve_precision("auto", device), key=f"{d / CONFIG_NAME} lm_source")
        width = lm.get_input_embeddings().weight.shape[1]
        projector_width = PrefixProjector.load(d).hidden_size  # checked before peft meets the adapter's shapes
        if width != projector_width:
            raise UserError(f"{d / CONFIG_NAME}: {base}@{config.lm_revision} has hidden size {width}, but the "
                            f"projector was trained for {projector_width}: not the base this model was trained on")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*gradient_checkpointing.*")
            try:
                lm = PeftModel.from_pretrained(lm, str(d / "adapter"), is_trainable=False)
            except Exception as e:  # noqa: BLE001 - truncated weights, corrupt JSON, shapes: all a damaged folder
                raise UserError(f"{d / 'adapter'}: cannot load the LoRA adapter ({type(e).__name__}: "
                                f"{(str(e).splitlines() or [''])[0][:160]}); {REBUILD}") from None
        if x["load_in_4bit"]:
            disable_4bit_repacking(lm)
        return lm


def build_qa_model(p, base: str | Path, device: torch.device | str = "cpu", *, encoder: dict,
                   feature_dim: int, regions: int, seed: int = 0) -> QAModel:
    """A trainable QA model from ``Phi2Params`` ``p``; ``base`` is the tiny base's folder for
    ``base_model: tiny``, else the hub id or folder itself. ``encoder``: the identity (and
    ``path``) of the image encoder that made the features."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    device = torch.device(device)
    tiny = p.base_model == "tiny"
    revision = "main" if tiny else p.revision
    if not tiny:
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
            lm.requires_grad_(False)
            if p.gradient_checkpointing:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        torch.manual_seed(seed)
        lm = get_peft_model(lm, LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout,
                                           use_rslora=p.use_rslora, target_modules=list(p.target_modules),
                                           bias="none", task_type="CAUSAL_LM"))
    if p.load_in_4bit:
        disable_4bit_repacking(lm)
    commit = None if tiny else hub.resolved_commit(base, revision)
    tokenizer = load_tokenizer(base, commit or revision)
    hidden = lm.get_input_embeddings().weight.shape[1]
    projector = PrefixProjector(feature_dim, regions, p.prefix_tokens, hidden, p.projector_hidden or None).to(device)
    config = PrefixLMConfig(
        kind=QAModel.KIND, lm_source="tiny" if tiny else str(p.base_model),
        lm_revision=None if tiny or hub.is_local(p.base_model) else (commit or revision),
        feature_dim=int(feature_dim), regions=int(regions), prefix_tokens=p.prefix_tokens,
        max_new_tokens=p.max_new_tokens, num_beams=1, max_prompt_tokens=p.max_seq_len, encoder=dict(encoder),
        extra={"load_in_4bit": p.load_in_4bit, "attn_implementation": p.attn_implementation, "template": QA.record(),
               "lora": {"r": p.lora_r, "alpha": p.lora_alpha, "dropout": p.lora_dropout,
                        "use_rslora": p.use_rslora, "target_modules": sorted(p.target_modules)}})
    model = QAModel(lm, projector, tokenizer, config)
    model.base_path = Path(base) if tiny else None
    return model


def load_qa_model(directory: str | Path = "models/phi2_vlm", device: str | torch.device = "auto") -> QAModel:
    """A saved QA model in one call: base (4-bit as trained) + adapter + projector, in eval mode."""
    return QAModel.load(directory, device, rebuild=REBUILD)
