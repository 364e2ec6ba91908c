"""Layer freezing against "spurious forgetting" (Zheng et al., arXiv 2501.13453): which LoRA parameters to freeze.

Much of the forgetting seen when a model is fine-tuned on a new task comes from the bottom layers losing the
alignment of the earlier tasks ("spurious forgetting"), and freezing the bottom ``k`` layers while training later tasks
removes a large part of it at little cost to the new task. These helpers only pick the names; setting
``requires_grad`` is the caller's plumbing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["frozen_parameter_names", "is_lora_parameter", "layer_index"]

# A dotted component naming the block stack, then the block index: Llama/Mistral/Qwen/OPT "layers", GPT-2/Falcon "h",
# BLOOM/MPT-style "blocks", T5 "block", BERT "layer".
_LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?=\.|$)")


def layer_index(param_name: str) -> int | None:
    """The transformer block index in ``param_name``, or None when it names no block (embeddings, final norm, head).

    Recognised: ``.layers.{i}.`` (Llama, Mistral, Qwen, OPT, GPT-NeoX), ``.h.{i}.`` (GPT-2, Falcon), ``.blocks.{i}.``,
    ``.block.{i}.`` (T5) and ``.layer.{i}.`` (BERT). With several matches (T5's ``block.0.layer.1``) the first,
    outermost one is the block.
    """
    match = _LAYER_PATTERN.search(param_name)
    return int(match.group(1)) if match else None


def is_lora_parameter(param_name: str) -> bool:
    """True when a dotted component of ``param_name`` starts with ``lora_`` (``lora_A``, ``lora_B``,
    ``lora_embedding_A/B``, DoRA's ``lora_magnitude_vector``): PEFT's trainable LoRA parameters."""
    return any(part.startswith("lora_") for part in param_name.split("."))


def frozen_parameter_names(names: Iterable[str], num_layers_frozen: int) -> list[str]:
    """The LoRA parameters of blocks ``0 .. num_layers_frozen - 1``, in the order of ``names``.

    Parameters outside any block, and non-LoRA parameters, are never selected. In an encoder-decoder every stack's
    bottom blocks are selected (each has its own ``layers.0``).

    Args:
        names: parameter names (e.g. ``model.named_parameters()`` keys).
        num_layers_frozen: ``k >= 0``; 0 freezes nothing.
    """
    if isinstance(num_layers_frozen, bool) or not isinstance(num_layers_frozen, int) or num_layers_frozen < 0:
        raise ValueError(f"num_layers_frozen must be an int >= 0, got {num_layers_frozen!r}")
    selected = []
    for name in names:
        index = layer_index(name)
        if index is not None and index < num_layers_frozen and is_lora_parameter(name):
            selected.append(name)
    return selected
