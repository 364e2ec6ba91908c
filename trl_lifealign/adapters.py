"""The one PEFT layer: base-model loading, LoRA wrapping, TRL's ``ref`` adapter, adapter state and layout checks.

Used by the lifelong runner, the memory-consolidation callback, the defences, the Axolotl trainer and the Axolotl
chain's evaluation, so that a model is loaded, wrapped, saved and compared the same way everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .distributed import gathered, is_dtensor, is_main_process, rank
from .errors import LifeAlignError

__all__ = [
    "ADAPTER_WEIGHTS",
    "AdapterFileError",
    "DEFAULT_ADAPTER",
    "LORA_LAYOUT_FIELDS",
    "REF_ADAPTER",
    "adapter_state",
    "check_same_lora",
    "drop_ref_adapter",
    "load_adapter_file",
    "load_adapter_state",
    "load_base_model",
    "lora_factors",
    "lora_layout",
    "quantization_config",
    "save_adapter",
    "wrap_lora",
]

DEFAULT_ADAPTER = "default"
REF_ADAPTER = "ref"  # TRL's frozen copy of the adapter as it was when the trainer was built
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# LoRA settings two adapters must share to continue one another (the rest, e.g. dropout, may differ).
LORA_LAYOUT_FIELDS = ("r", "lora_alpha", "target_modules", "use_dora", "use_rslora")
_FACTOR_PATTERN = r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)\.{adapter}(\.weight)?$"


class AdapterFileError(LifeAlignError, RuntimeError):
    """An adapter file is missing, truncated or does not match the model."""


# ---------------------------------------------------------------------------------------------------- base model


def quantization_config(compute_dtype: torch.dtype, overrides: Mapping[str, Any] | None = None):
    """The 4-bit NF4 QLoRA configuration Axolotl 0.19 builds (double quantisation, bf16 storage so DeepSpeed ZeRO-3
    can partition the quantised weights), with ``overrides`` (Axolotl's ``bnb_config_kwargs``) applied last."""
    from transformers import BitsAndBytesConfig

    values: dict[str, Any] = {
        "load_in_4bit": True,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_quant_storage": torch.bfloat16,
    }
    values.update(overrides or {})
    return BitsAndBytesConfig(**values)


def load_base_model(name_or_path: str, dtype: torch.dtype | str = torch.float32, load_in_4bit: bool = False,
                    bnb_overrides: Mapping[str, Any] | None = None, **kwargs: Any):
    """The causal LM every path trains and scores on: ``dtype`` weights, or 4-bit NF4 (:func:`quantization_config`)
    with ``dtype`` as compute dtype. Extra keyword arguments go to ``from_pretrained`` (e.g. ``device_map``)."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if load_in_4bit:
        kwargs["quantization_config"] = quantization_config(dtype, bnb_overrides)
    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)


def wrap_lora(model, lora, seed: int):
    """``model`` with a ``default`` LoRA adapter built from ``lora`` (any object with ``r``, ``alpha``, ``dropout``,
    ``target_modules``, ``load_in_4bit``), its initial ``lora_A`` drawn from ``seed`` so every run of a configuration
    starts from the same adapter. A ``PeftModel`` is checked for a ``default`` adapter and kept (TRL's ``ref`` copy
    dropped)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from .compat import quiet_checkpointing_deprecations

    if isinstance(model, PeftModel):
        if DEFAULT_ADAPTER not in model.peft_config:
            raise ValueError(f"the PeftModel needs a {DEFAULT_ADAPTER!r} adapter, it has {sorted(model.peft_config)}")
        drop_ref_adapter(model)
        return model
    if lora.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                        task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]), quiet_checkpointing_deprecations():
        torch.manual_seed(seed)
        return get_peft_model(model, config)


# ---------------------------------------------------------------------------------------------------- adapters


def drop_ref_adapter(model) -> None:
    """Delete TRL's frozen ``ref`` adapter, if any, and make ``default`` the active adapter again."""
    if REF_ADAPTER in (getattr(model, "peft_config", None) or {}):
        model.delete_adapter(REF_ADAPTER)
        model.set_adapter(DEFAULT_ADAPTER)


def lora_factors(model, adapter: str = DEFAULT_ADAPTER) -> dict[str, torch.nn.Parameter]:
    """``{parameter name: parameter}`` of ``adapter``'s LoRA factors (``lora_A`` / ``lora_B``, embeddings too), in
    model order."""
    pattern = re.compile(_FACTOR_PATTERN.format(adapter=re.escape(adapter)))
    return {name: param for name, param in model.named_parameters() if pattern.search(name)}


def adapter_state(model, adapter: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """``adapter``'s weights under PEFT's state-dict names: full (gathered when sharded), float32, on the CPU, on
    every rank (every rank must call it)."""
    from peft import get_peft_model_state_dict

    params = list(lora_factors(model, adapter).values())
    with gathered(params):
        state = get_peft_model_state_dict(model, adapter_name=adapter)
        return {k: (v.full_tensor() if is_dtensor(v) else v).detach().to("cpu", torch.float32, copy=True)
                for k, v in state.items()}


def load_adapter_state(model, state: Mapping[str, torch.Tensor], adapter: str = DEFAULT_ADAPTER) -> None:
    """Write ``state`` (from :func:`adapter_state` or an adapter file) into ``adapter``; every rank must call it."""
    from peft import set_peft_model_state_dict

    from .distributed import write_full

    params = lora_factors(model, adapter)
    if any(is_dtensor(p) for p in params.values()):
        # Sharded parameters take a full value on every rank, factor by factor.
        by_key = {re.sub(rf"\.{re.escape(adapter)}(?=\.|$)", "", name): name for name in params}
        for key, value in state.items():
            target = by_key.get(key)
            if target is None:
                raise AdapterFileError(f"adapter state does not match the model: unexpected key {key}")
            write_full(params[target], value)
        return
    with gathered(list(params.values()), modify=True):
        if rank() == 0 or not any(hasattr(p, "ds_id") for p in params.values()):
            result = set_peft_model_state_dict(model, dict(state), adapter_name=adapter)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise AdapterFileError(f"adapter state does not match the model: unexpected keys {unexpected[:3]}")


def save_adapter(directory: str | Path, weights: Mapping[str, torch.Tensor], peft_config, tokenizer=None) -> None:
    """Write a PEFT adapter folder (``adapter_model.safetensors``, ``adapter_config.json``, the tokenizer) on the main
    process; ``weights`` come from :func:`adapter_state`. The folder is loadable with ``PeftModel.from_pretrained``."""
    from safetensors.torch import save_file

    if not is_main_process():
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(dict(weights), str(directory / ADAPTER_WEIGHTS))
    peft_config.save_pretrained(str(directory))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


def load_adapter_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter's safetensors file, or :class:`AdapterFileError` naming the file when it is missing,
    truncated or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file {path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterFileError(f"adapter file {path} is truncated or corrupt: {error}") from None


# ------------------------------------------------------------------------------------------------------- layout


def lora_layout(peft_config) -> dict[str, Any]:
    """The settings of a LoRA config that two adapters must share to continue one another (target modules sorted)."""
    layout = {}
    for name in LORA_LAYOUT_FIELDS:
        value = getattr(peft_config, name, None)
        if isinstance(value, (set, list, tuple)):
            value = sorted(value)
        layout[name] = value
    return layout


def check_same_lora(expected, found, where: str) -> None:
    """Raise ``ValueError`` naming every layout field where LoRA config ``found`` differs from ``expected``."""
    ours, theirs = lora_layout(expected), lora_layout(found)
    differences = [f"{name}: {ours[name]!r} vs {theirs[name]!r}" for name in LORA_LAYOUT_FIELDS
                   if ours[name] != theirs[name]]
    if differences:
        raise ValueError(f"the LoRA settings differ from the adapter in {where} ({'; '.join(differences)}): every "
                         "task of a sequence must use the same LoRA layout")
