"""Worker for tests/test_slmc_resume.py (one process = one or more task boundaries on a tiny LoRA model).

    python tests/_slmc_resume_worker.py task MEMORY_DIR STATE_FILE TASK   # load factors, one task, save factors
    python tests/_slmc_resume_worker.py hammer MEMORY_DIR                  # consolidate + save in a loop until killed

A "task" is a deterministic pseudo-training step (seeded perturbation with a component shared by all tasks), so a
sequence split over processes can be compared with the same sequence in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

THETA, LAMBDA = 0.7, 0.2


def build_model():
    from _slmc_utils import tiny_lora_model
    from conftest import PREFERENCE_ROWS

    from trl_lifealign.tiny import train_tokenizer

    texts = [text for row in PREFERENCE_ROWS for text in row.values()]
    return tiny_lora_model(train_tokenizer(texts, vocab_size=300))


def pseudo_train(model, task: int) -> None:
    shared = torch.Generator().manual_seed(1000)
    own = torch.Generator().manual_seed(task)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A.default." in name or ".lora_B.default." in name:
                common = torch.randn(param.shape, generator=shared)
                param.add_(0.05 * common + 0.05 * torch.randn(param.shape, generator=own))


def run_task(model, slmc, task: int):
    slmc.begin_task(model)
    pseudo_train(model, task)
    return slmc.consolidate(model)


def main() -> None:
    from safetensors.torch import load_file, save_file

    from trl_lifealign.slmc import MemoryConsolidationCallback

    mode, memory_dir = sys.argv[1], Path(sys.argv[2])
    model = build_model()
    slmc = MemoryConsolidationCallback(memory_dir, energy_threshold=THETA, overlap_weight=LAMBDA)
    if mode == "task":
        state_file, task = Path(sys.argv[3]), int(sys.argv[4])
        if state_file.exists():
            model.load_state_dict(load_file(state_file), strict=False)
        run_task(model, slmc, task)
        factors = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
        save_file(factors, str(state_file) + ".tmp")
        Path(str(state_file) + ".tmp").replace(state_file)
    elif mode == "hammer":
        task = 0
        while True:
            run_task(model, slmc, task)
            print(slmc.memory.task_count, flush=True)
            task += 1
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
