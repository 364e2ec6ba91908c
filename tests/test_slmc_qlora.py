"""SLMC on a real bitsandbytes 4-bit (QLoRA) base: only the LoRA factors are consolidated, the 4-bit base is
untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _slmc_utils import FactorRecorder, dpo_config, drop_ref_adapter, lora_factors, reference_sequence, task_dataset

pytestmark = pytest.mark.bnb


def test_qlora_consolidation(tmp_path, tiny_tokenizer, preference_rows):
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import DPOTrainer

    from trl_lifealign.slmc import MemoryConsolidationCallback
    from trl_lifealign.tiny import build_tiny_llama

    build_tiny_llama(tiny_tokenizer, seed=0).save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization,
                                                dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    layer = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert type(layer).__name__ == "Linear4bit" and type(layer.get_base_layer().weight).__name__ == "Params4bit"
    quantized_before = {n: b.detach().clone() for n, b in model.named_parameters() if "lora_" not in n}

    slmc = MemoryConsolidationCallback(tmp_path / "memory", energy_threshold=0.6, overlap_weight=0.3)
    recorder = FactorRecorder()
    for task in range(2):
        drop_ref_adapter(model)
        trainer = DPOTrainer(
            model=model, args=dpo_config(tmp_path / f"out{task}"), train_dataset=task_dataset(preference_rows, task),
            processing_class=tiny_tokenizer, callbacks=[recorder, slmc],
        )
        trainer.train()
    final = lora_factors(model)
    dtype = model.get_parameter(next(iter(final))).dtype  # TRL may cast trainable LoRA factors of a 4-bit model
    for name in final:
        updates = [(recorder.end[t][name] - recorder.begin[t][name]).double().numpy() for t in range(2)]
        assert all(np.abs(u).max() > 1e-3 for u in updates), name
        betas = reference_sequence(updates, 0.6, 0.3)
        for task in range(2):
            post = recorder.begin[1][name] if task == 0 else final[name]
            expected = torch.from_numpy(recorder.begin[task][name].double().numpy() + betas[task]).to(dtype).double()
            ulp = 2e-7 if dtype == torch.float32 else 8e-3  # one rounding of the write-back in the factor's dtype
            assert torch.allclose(post.double(), expected, rtol=ulp, atol=ulp * float(expected.abs().max())), name
            assert float((recorder.end[task][name] - post).abs().max()) > 1e-3, name
    # The quantized base (and every non-LoRA parameter) is bit-identical.
    for name, before in quantized_before.items():
        assert torch.equal(before, model.get_parameter(name).detach()), name
    assert slmc.memory.task_count == 2
