"""Step-time overhead of FPOTrainer over TRL's DPOTrainer on the same tiny model and data.

Both trainers are built once on identical copies of a tiny Llama (explicit reference model, fp32, CPU), then timed in
interleaved rounds (DPO, FPO, DPO, FPO, ...) so that machine noise hits both alike. Each round times `--steps`
optimizer steps (`training_step` + optimizer step) after `--warmup` untimed ones; the reported figure is the ratio of
the median FPO step to the median DPO step (target <= 1.02), in wall time and in process CPU time.

    python benchmarks/fpo_overhead.py                    # defaults: 20 rounds x 10 steps, hidden 64, batch 4
    python benchmarks/fpo_overhead.py --rounds 11 --steps 30 --hidden-size 128
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

TOPICS = [
    "apples", "rivers", "music", "winter", "books", "trains", "gardens", "coffee", "cats", "stars", "bread", "ships",
]


def build_trainer(kind: str, tokenizer, rows, args, output_dir: Path, setup: str):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from trl_lifealign.fpo import FPOConfig, FPOTrainer
    from trl_lifealign.tiny import build_tiny_llama

    common = dict(
        output_dir=str(output_dir / kind), bf16=False, report_to="none", per_device_train_batch_size=args.batch_size,
        learning_rate=1e-4, logging_steps=10**9, save_strategy="no", disable_tqdm=True, seed=0, beta=0.1,
    )
    config = DPOConfig(**common) if kind == "dpo" else FPOConfig(focal_gamma=2.0, **common)
    trainer_cls = DPOTrainer if kind == "dpo" else FPOTrainer
    model_kwargs = dict(hidden_size=args.hidden_size, num_hidden_layers=args.layers, num_attention_heads=4)
    model = build_tiny_llama(tokenizer, seed=0, **model_kwargs)
    if setup == "lora":  # new adapter; the reference is the base model with the adapter disabled
        from peft import LoraConfig

        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        return trainer_cls(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                           peft_config=lora)
    return trainer_cls(
        model=model, ref_model=build_tiny_llama(tokenizer, seed=1, **model_kwargs),
        args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
    )


def make_batches(trainer, count: int):
    loader = trainer.get_train_dataloader()
    batches = []
    while len(batches) < count:
        for batch in loader:
            batches.append(batch)
            if len(batches) == count:
                break
    return batches


def run_steps(trainer, batches) -> list[tuple[float, float]]:
    """Per-step (wall, CPU) seconds of full optimizer steps (forward, reference forward, loss, backward, Adam step).

    CPU time of this process is reported beside wall time: on a shared machine it is far less sensitive to other
    processes, and with one intra-op thread it measures the same work.
    """
    model = trainer.model
    model.train()
    timings = []
    for batch in batches:
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.training_step(model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        timings.append((time.perf_counter() - wall, time.process_time() - cpu))
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds per trainer")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per trainer before the first round")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--setup", choices=["full", "lora", "both"], default="both",
                        help="full fine-tuning with an explicit ref_model, a new LoRA adapter, or both in turn")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for setup in ("full", "lora") if args.setup == "both" else (args.setup,):
        measure(args, setup)
    return 0


def measure(args, setup: str) -> None:

    from trl_lifealign.tiny import train_tokenizer

    rows = [
        {"prompt": f"Tell me about {t}.", "chosen": f"I like {t} a lot, truly.", "rejected": f"I hate {t} a lot."}
        for t in TOPICS
    ]
    tokenizer = train_tokenizer([text for row in rows for text in row.values()], vocab_size=300)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {kind: build_trainer(kind, tokenizer, rows, args, Path(tmp), setup) for kind in ("dpo", "fpo")}
        # The very same collated batches for both trainers (their collators are identical).
        shared_batches = make_batches(trainers["dpo"], args.steps)
        batches = {}
        for kind, trainer in trainers.items():
            trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
            trainer.current_gradient_accumulation_steps = 1  # normally set by Trainer's training loop
            batches[kind] = [trainer._prepare_inputs(dict(b)) for b in shared_batches]
            run_steps(trainer, batches[kind][: args.warmup])
        wall = {"dpo": [], "fpo": []}
        cpu = {"dpo": [], "fpo": []}
        for round_index in range(args.rounds):
            # Alternate which trainer goes first so neither always runs on a warmer cache.
            order = ("dpo", "fpo") if round_index % 2 == 0 else ("fpo", "dpo")
            for kind in order:
                for wall_s, cpu_s in run_steps(trainers[kind], batches[kind]):
                    wall[kind].append(wall_s)
                    cpu[kind].append(cpu_s)

    import trl

    print(f"\n[{setup}] trl {trl.__version__}, torch {torch.__version__}, threads {args.threads}, "
          f"hidden {args.hidden_size}, "
          f"layers {args.layers}, batch {args.batch_size} pairs, {args.rounds} interleaved rounds x {args.steps} steps")
    print(f"{'trainer':<8}{'wall ms/step (median, p25, p75)':>34}{'CPU ms/step (median, p25, p75)':>34}")
    for kind in ("dpo", "fpo"):
        cells = []
        for values in (wall[kind], cpu[kind]):
            q1, q2, q3 = statistics.quantiles(values, n=4)
            cells.append(f"{1e3 * q2:.2f}, {1e3 * q1:.2f}, {1e3 * q3:.2f}")
        print(f"{kind.upper():<8}{cells[0]:>34}{cells[1]:>34}")
    for name, values in (("wall", wall), ("CPU", cpu)):
        ratio = statistics.median(values["fpo"]) / statistics.median(values["dpo"])
        print(f"FPO/DPO {name} step-time ratio (median step): {ratio:.3f}  (target <= 1.02)")


if __name__ == "__main__":
    raise SystemExit(main())
