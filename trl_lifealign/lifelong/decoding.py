"""Greedy decoding, shared by the generation metrics and the local LLM judge."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .evaluation import model_device

__all__ = ["generate_greedy"]


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: Sequence[Any], max_new_tokens: int = 64, batch_size: int = 8) -> list:
    """Greedy continuations (decoded, special tokens stripped) of each prompt; message-list prompts go through the
    tokenizer's chat template with the generation prompt."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    outputs: list[str] = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                     if isinstance(p, list) else p for p in batch]
            encoded = tokenizer(texts, return_tensors="pt", padding=True,
                                add_special_tokens=not isinstance(batch[0], list)).to(device)
            generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
            outputs.extend(tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1]:],
                                                  skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return outputs
