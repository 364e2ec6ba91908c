"""The EWC, layer-freezing and KL-anchor defences on real tiny LoRA models trained over two tasks (CPU, fp32).

Checked exactly where possible: the gradient EWC adds against strength·F·(θ−θ*), the stored Fisher against one
computed row by row (with the online decay), a resumed callback against the uninterrupted one, frozen factors bit for
bit (weight decay on, TRL toggling adapters, activation checkpointing on), the KL term against an independent
computation and the loss with and without it; plus the loud errors and a plain ``trl.DPOTrainer`` with the mixin.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from _slmc_utils import tiny_lora_model
from datasets import Dataset
from transformers import TrainerCallback, TrainerControl, TrainerState
from trl import DPOConfig, DPOTrainer

from trl_lifealign.adapters import REF_ADAPTER, drop_ref_adapter, lora_factors
from trl_lifealign.callbacks import bind_callbacks
from trl_lifealign.compat import quiet_checkpointing_deprecations
from trl_lifealign.defences.base import AuxiliaryLossMixin, read_factors, write_factors
from trl_lifealign.defences.config import EWCConfig, FreezeLayersConfig, KLAnchorConfig
from trl_lifealign.defences.ewc.callback import (
    MANIFEST_NAME,
    EWCCallback,
    EWCState,
    EWCStateError,
    _save_ewc_state,
    load_ewc_state,
)
from trl_lifealign.defences.freezing.callback import FreezeLayersCallback
from trl_lifealign.defences.lwf.callback import MEMORY_FILE, KLAnchorCallback, KLAnchorError, load_anchor_memory
from trl_lifealign.distributed import UnsupportedShardingError
from trl_lifealign.fpo import FPOConfig, FPOTrainer

# ------------------------------------------------------------------------------------------------------- helpers


def _model(tokenizer, seed: int = 0):
    with quiet_checkpointing_deprecations():
        return tiny_lora_model(tokenizer, seed=seed)


def _args(tmp_path, config_cls=FPOConfig, **overrides):
    kwargs = {"output_dir": str(tmp_path / "out"), "bf16": False, "use_cpu": True, "report_to": [],
              "per_device_train_batch_size": 2, "max_steps": 3, "learning_rate": 2e-2, "logging_steps": 1,
              "save_strategy": "no", "disable_tqdm": True, "max_length": 48, "seed": 0, "beta": 0.5,
              "gradient_checkpointing": False, "dataloader_num_workers": 0}
    kwargs.update(overrides)
    with quiet_checkpointing_deprecations():  # transformers 5.23 renamed DPOConfig's gradient_checkpointing
        return config_cls(**kwargs)


def _train(model, tokenizer, rows, task, tmp_path, callbacks, trainer_cls=FPOTrainer, **overrides):
    """Start ``task`` on every defence, build the trainer on ``rows`` of the task and train it."""
    for callback in callbacks:
        if hasattr(callback, "start_task"):
            callback.start_task(task)
    if trainer_cls is not FPOTrainer:
        drop_ref_adapter(model)  # peft 0.21 refuses TRL's second "ref" copy; FPOTrainer drops it itself
    config_cls = FPOConfig if issubclass(trainer_cls, FPOTrainer) else DPOConfig
    trainer = trainer_cls(model=model, args=_args(tmp_path / f"task{task}", config_cls, **overrides),
                          train_dataset=Dataset.from_list(rows[4 * task:4 * task + 4]), processing_class=tokenizer,
                          callbacks=list(callbacks))
    if trainer_cls is not FPOTrainer:
        bind_callbacks(trainer)
    with quiet_checkpointing_deprecations():  # TRL's own reference forward uses the old names (trl 1.16)
        trainer.train()
    return trainer


def _logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


class _GradProbe(TrainerCallback):
    """Records the factors and their gradients at each ``on_pre_optimizer_step`` (listed before/after a defence)."""

    def __init__(self):
        self.grads, self.params = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        factors = lora_factors(model)
        self.grads.append({n: p.grad.detach().clone() for n, p in factors.items()})
        self.params.append({n: p.detach().clone() for n, p in factors.items()})


class _GradProbeAfter(_GradProbe):
    """The same, under another class name (a trainer warns about two callbacks of one class)."""


def _fisher_by_rows(trainer, model):
    """Mean over the task's rows of the squared gradient of each row's preference loss (batches of one row)."""
    model.train()
    factors = lora_factors(model)
    total = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in factors.items()}
    dataset = trainer.train_dataset
    for index in range(len(dataset)):
        row = {k: dataset[index][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        model.zero_grad(set_to_none=True)
        trainer.compute_loss(model, trainer._prepare_inputs(trainer.data_collator([row]))).backward()
        for name, param in factors.items():
            total[name] += param.grad.double() ** 2
    model.zero_grad(set_to_none=True)
    return {n: (t / len(dataset)).float() for n, t in total.items()}


def _assert_close(actual: dict, expected: dict, rtol=1e-5, atol=1e-10):
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(actual[name].float(), expected[name].float(), rtol=rtol, atol=atol,
                                   msg=lambda message, name=name: f"{name}: {message}")


def _assert_added(after: dict, before: dict, added: dict):
    """``after == before + added`` elementwise up to float32 rounding of the terms (not of their possibly tiny sum)."""
    for name in added:
        error = (after[name].double() - before[name].double() - added[name].double()).abs()
        bound = 1e-6 * (before[name].double().abs() + added[name].double().abs()) + 1e-12
        assert bool((error <= bound).all()), f"{name}: off by up to {float((error - bound).max()):.3g}"


def _begin(callback, model):
    callback.on_train_begin(None, TrainerState(), TrainerControl(), model=model)


# ----------------------------------------------------------------------------------------------------------- EWC


def _resumed_penalty(callback, trainer, model, start, weights):
    """Begin task 1 on ``callback`` with the model at ``start``, then apply its step at ``weights`` to zero gradients
    (``callback.grads`` keeps the result); the model is given back its weights."""
    trained = read_factors(model)
    callback.bind_trainer(trainer)
    callback.start_task(1)
    write_factors(model, start)
    _begin(callback, model)
    write_factors(model, weights)
    for param in lora_factors(model).values():
        param.grad = torch.zeros_like(param)
    callback.on_pre_optimizer_step(None, TrainerState(), TrainerControl(), model=model)
    callback.grads = {n: p.grad.clone() for n, p in lora_factors(model).items()}
    model.zero_grad(set_to_none=True)
    write_factors(model, trained)
    return callback


def test_ewc_gradient_fisher_and_resume_are_exact(tmp_path, tiny_tokenizer, preference_rows):
    config = EWCConfig(strength=50.0, decay=0.7, fisher_batches=10)
    state_dir = tmp_path / "ewc"
    model = _model(tiny_tokenizer)
    ewc = EWCCallback(config, state_dir)

    # Task 0: batches of one row, so the Fisher over the whole task is order-free and can be recomputed by rows.
    trainer0 = _train(model, tiny_tokenizer, preference_rows, 0, tmp_path, [ewc], per_device_train_batch_size=1)
    fisher0 = _fisher_by_rows(trainer0, model)
    _assert_close(load_ewc_state(state_dir).fisher, fisher0)
    assert _logged(trainer0, "ewc/tasks") == [1.0] and not _logged(trainer0, "ewc/penalty")
    values = torch.cat([f.reshape(-1) for f in fisher0.values()])
    assert _logged(trainer0, "ewc/fisher_mean")[0] == pytest.approx(values.mean().item(), rel=1e-5)
    assert _logged(trainer0, "ewc/fisher_max")[0] == pytest.approx(values.max().item(), rel=1e-5)
    after_task0 = tmp_path / "ewc_after_task0"
    shutil.copytree(state_dir, after_task0)

    # Task 1: the gradient EWC adds is exactly strength * F * (theta - theta*), theta* = the task's start.
    start = read_factors(model)
    before, after = _GradProbe(), _GradProbeAfter()
    trainer1 = _train(model, tiny_tokenizer, preference_rows, 1, tmp_path, [before, ewc, after],
                      per_device_train_batch_size=1)
    penalties = _logged(trainer1, "ewc/penalty")
    assert len(penalties) == 3 and penalties[0] == 0.0 and penalties[-1] > 0
    for step, params in enumerate(before.params):
        added = {n: config.strength * fisher0[n] * (params[n] - start[n]) for n in start}
        _assert_added(after.grads[step], before.grads[step], added)
        expected_penalty = sum(0.5 * config.strength * (fisher0[n].double() * (params[n] - start[n]).double() ** 2)
                               .sum().item() for n in start)
        assert penalties[step] == pytest.approx(expected_penalty, rel=1e-5, abs=1e-12)
    assert any(added[n].abs().max() > 0 for n in added)

    # The stored Fisher is decay * F_0 + F_1 and records both tasks.
    fisher1 = _fisher_by_rows(trainer1, model)
    stored = load_ewc_state(state_dir)
    _assert_close(stored.fisher, {n: config.decay * fisher0[n] + fisher1[n] for n in fisher0})
    assert stored.task_indices == [0, 1] and _logged(trainer1, "ewc/tasks") == [2.0]
    manifest = json.loads((state_dir / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == 1 and manifest["tasks"] == 2

    # Resume: a new callback on the state saved after task 0 gives the same penalty and gradient at the same weights.
    resumed = _resumed_penalty(EWCCallback(config, after_task0), trainer1, model, start, before.params[-1])
    assert resumed.last_penalty == pytest.approx(penalties[-1], rel=1e-6)
    _assert_close(resumed.grads, added, rtol=1e-6, atol=1e-12)

    # The state after task 1 already holds task 1: starting task 1 on it again is refused.
    again = EWCCallback(config, state_dir)
    again.bind_trainer(trainer1)
    again.start_task(1)
    with pytest.raises(EWCStateError, match="already holds task"):
        _begin(again, model)


def test_ewc_state_files_fail_loudly(tmp_path):
    state_dir = tmp_path / "ewc"
    with pytest.raises(EWCStateError, match=str(state_dir / MANIFEST_NAME)):
        load_ewc_state(state_dir)
    fisher = {"a.lora_A.default.weight": torch.rand(4, 3), "a.lora_B.default.weight": torch.rand(3, 4)}
    _save_ewc_state(state_dir, EWCState(fisher=fisher, task_indices=[0]), decay=0.9)
    _assert_close(load_ewc_state(state_dir).fisher, fisher, rtol=0, atol=0)
    data_file = state_dir / json.loads((state_dir / MANIFEST_NAME).read_text())["data_file"]
    data_file.write_bytes(data_file.read_bytes()[:-7])
    with pytest.raises(EWCStateError, match=f"{data_file}.*truncated"):
        load_ewc_state(state_dir)
    data_file.unlink()
    with pytest.raises(EWCStateError, match=f"{data_file}.*missing"):
        load_ewc_state(state_dir)
    (state_dir / MANIFEST_NAME).write_text('{"format": "trl-lifealign-ewc", "form')
    with pytest.raises(EWCStateError, match="truncated or corrupt"):
        load_ewc_state(state_dir)


def test_ewc_and_freezing_refuse_deepspeed(monkeypatch, tmp_path, tiny_tokenizer):
    model = _model(tiny_tokenizer)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    ewc = EWCCallback(EWCConfig(), tmp_path / "ewc")
    ewc.start_task(1)
    with pytest.raises(UnsupportedShardingError, match="EWCCallback does not support DeepSpeed"):
        _begin(ewc, model)
    freeze = FreezeLayersCallback(FreezeLayersConfig(num_layers=1))
    freeze.start_task(1)
    with pytest.raises(UnsupportedShardingError, match="FreezeLayersCallback does not support DeepSpeed"):
        _begin(freeze, model)


def test_ewc_needs_a_bound_trainer(tmp_path, tiny_tokenizer, preference_rows):
    model = _model(tiny_tokenizer)
    ewc = EWCCallback(EWCConfig(), tmp_path / "ewc")
    ewc.start_task(0)
    trainer = DPOTrainer(model=model, args=_args(tmp_path, DPOConfig),
                         train_dataset=Dataset.from_list(preference_rows[:4]), processing_class=tiny_tokenizer,
                         callbacks=[ewc])  # not bound: no bind_callbacks
    with pytest.raises(RuntimeError, match="use FPOTrainer or call trl_lifealign.callbacks.bind_callbacks"):
        trainer.train()


# -------------------------------------------------------------------------------------------------- freezing


def test_frozen_factors_stay_bit_identical_while_the_others_train(tmp_path, tiny_tokenizer, preference_rows):
    model = _model(tiny_tokenizer)
    freeze = FreezeLayersCallback(FreezeLayersConfig(num_layers=1))
    trainer0 = _train(model, tiny_tokenizer, preference_rows, 0, tmp_path, [freeze])
    assert freeze.summary() == {"frozen_layers": 0, "frozen_factors": 0}
    assert _logged(trainer0, "freeze/frozen_factors") == [0.0]

    # Task 1: TRL's "ref" adapter (toggled around every reference forward), weight decay and non-reentrant
    # activation checkpointing all on; the optimizer is built before the callback freezes anything.
    start = read_factors(model)
    trainer1 = _train(model, tiny_tokenizer, preference_rows, 1, tmp_path, [freeze], weight_decay=0.5,
                      learning_rate=5e-2, gradient_checkpointing=True,
                      gradient_checkpointing_kwargs={"use_reentrant": False})
    assert REF_ADAPTER in model.peft_config
    end = read_factors(model)
    frozen = [n for n in start if ".layers.0." in n]
    assert len(frozen) == 4 and freeze.summary() == {"frozen_layers": 1, "frozen_factors": 4}
    assert _logged(trainer1, "freeze/frozen_factors") == [4.0]
    for name in start:
        assert torch.equal(start[name], end[name]) == (name in frozen), name
    listed = {id(p) for group in trainer1.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in listed for n, p in lora_factors(model).items() if n in frozen)

    # Handed back as received: nothing left frozen, every factor trainable and receiving gradients again.
    factors = lora_factors(model)
    assert all(p.requires_grad for p in factors.values())
    model.train()
    model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.float().square().mean().backward()
    assert all(factors[n].grad is not None for n in frozen)
    model.zero_grad(set_to_none=True)


def test_freezing_needs_a_layer_left_to_train_and_restores_a_moved_factor(tiny_tokenizer, caplog):
    model = _model(tiny_tokenizer)  # 2 decoder layers with LoRA
    freeze = FreezeLayersCallback(FreezeLayersConfig(num_layers=2))
    freeze.start_task(0)  # refused at the first task already, before anything trained
    with pytest.raises(ValueError, match=r"num_layers=2: the model has LoRA factors in 2 decoder layer"):
        _begin(freeze, model)

    # Something that steps a frozen factor anyway (e.g. an optimizer stepping without gradients) is undone, loudly.
    freeze = FreezeLayersCallback(FreezeLayersConfig(num_layers=1))
    freeze.start_task(1)
    _begin(freeze, model)
    name, param = next((n, p) for n, p in lora_factors(model).items() if ".layers.0." in n)
    start = param.detach().clone()
    with torch.no_grad():
        param.add_(1.0)
    freeze.on_train_end(None, TrainerState(), TrainerControl(), model=model)
    assert torch.equal(param.detach(), start) and "1 frozen factor(s) changed" in caplog.text


# ------------------------------------------------------------------------------------------------- KL anchor


def _reference_kl(model, pairs):
    """KL(π_ref ‖ π_θ) over the answer tokens of ``pairs``, with plain log-softmaxes (independent of token_kl)."""
    from trl.trainer.utils import use_adapter

    total, count = 0.0, 0
    for pair in pairs:
        ids = torch.tensor([pair["prompt_ids"] + pair["answer_ids"]])
        with torch.no_grad():
            policy = F.log_softmax(model(input_ids=ids).logits.double(), -1)
            with use_adapter(model, REF_ADAPTER):
                reference = F.log_softmax(model(input_ids=ids).logits.double(), -1)
        first = len(pair["prompt_ids"]) - 1  # the position predicting the first answer token
        kl = (reference.exp() * (reference - policy)).sum(-1)[0, first:ids.shape[1] - 1]
        total, count = total + kl.sum().item(), count + kl.numel()
    return total / count


def _set_checkpointing(model, kwargs):
    """Activation checkpointing off (None) or on with ``kwargs``, with the input hook the Trainer adds for PEFT."""
    base = model.get_base_model()
    with quiet_checkpointing_deprecations():
        if kwargs is None:
            base.gradient_checkpointing_disable()
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            model.enable_input_require_grads()


def _check_same_term_with_any_checkpointing(anchor, trainer, model, inputs):
    """The same KL term and gradients with activation checkpointing off, non-reentrant and reentrant."""
    values, grads = [], []
    for kwargs in (None, {"use_reentrant": False}, {"use_reentrant": True}):
        _set_checkpointing(model, kwargs)
        model.zero_grad(set_to_none=True)
        loss = anchor.auxiliary_loss(trainer, model, inputs)
        loss.backward()
        values.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in lora_factors(model).items()})
    _set_checkpointing(model, None)
    model.zero_grad(set_to_none=True)
    for value, grad in zip(values[1:], grads[1:]):
        assert value == pytest.approx(values[0], rel=1e-6)
        _assert_close(grad, grads[0], rtol=1e-5, atol=1e-9)
    assert any(g.abs().max() > 0 for g in grads[0].values())


def test_kl_anchor_memory_term_and_loss(tmp_path, tiny_tokenizer, preference_rows):
    config = KLAnchorConfig(weight=0.5, prompts_per_task=3, capacity=5, max_new_tokens=5, batch_size=8)
    state_dir = tmp_path / "kl"
    model = _model(tiny_tokenizer)
    anchor = KLAnchorCallback(config, state_dir)
    eos = tiny_tokenizer.eos_token_id

    trainer0 = _train(model, tiny_tokenizer, preference_rows, 0, tmp_path, [anchor])
    pairs = load_anchor_memory(state_dir)
    assert pairs == anchor.pairs and len(pairs) == 3 and {p["task_index"] for p in pairs} == {0}
    task_prompts = {tuple(p) for p in trainer0.train_dataset["prompt_ids"]}
    assert all(tuple(p["prompt_ids"]) in task_prompts for p in pairs)
    assert len({tuple(p["prompt_ids"]) for p in pairs}) == 3
    assert all(p["answer_ids"][-1] == eos or len(p["answer_ids"]) == 5 for p in pairs)
    assert all(eos not in p["answer_ids"][:-1] for p in pairs)
    longest = max(pairs, key=lambda p: len(p["prompt_ids"]))  # not padded in its generation batch
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([longest["prompt_ids"]]), max_new_tokens=5, do_sample=False,
                             eos_token_id=eos, pad_token_id=tiny_tokenizer.pad_token_id)
    model.train()
    greedy = out[0, len(longest["prompt_ids"]):].tolist()
    assert longest["answer_ids"] == (greedy[:greedy.index(eos) + 1] if eos in greedy else greedy)
    assert _logged(trainer0, "kl_anchor/pairs") == [3.0] and not _logged(trainer0, "kl_anchor/kl")

    # Task 1 (activation checkpointing on): KL 0 at the start (policy = ref), positive once the policy moved.
    trainer1 = _train(model, tiny_tokenizer, preference_rows, 1, tmp_path, [anchor], gradient_checkpointing=True)
    kls = _logged(trainer1, "kl_anchor/kl")
    assert len(kls) == 3 and kls[0] == 0.0 and kls[-1] > 0

    # The loss holds exactly weight * KL, the KL of every stored pair (5 <= batch_size) computed independently.
    model.train()
    rows = [{k: trainer1.train_dataset[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(2)]
    inputs = trainer1._prepare_inputs(trainer1.data_collator(rows))
    with torch.no_grad():
        with_anchor = trainer1.compute_loss(model, inputs).item()
        kl = anchor.last_kl
        anchor.trainer = None  # the mixin only asks callbacks bound to it
        without = trainer1.compute_loss(model, inputs).item()
        anchor.bind_trainer(trainer1)
    assert kl > 0 and with_anchor - without == pytest.approx(config.weight * kl, rel=1e-4)
    # fp32: the trainer scores the pairs in one padded batch, the reference one by one (another reduction order, and
    # another matmul blocking with 2 threads), so they agree to ~1e-5 relative, not to the last bit.
    assert kl == pytest.approx(_reference_kl(model, load_anchor_memory(state_dir)), rel=1e-4)

    _check_same_term_with_any_checkpointing(anchor, trainer1, model, inputs)

    # FIFO to capacity 5: the newest two of task 0 and the three of task 1.
    assert [p["task_index"] for p in load_anchor_memory(state_dir)] == [0, 0, 1, 1, 1]
    assert anchor.summary() == {"pairs": 5, "added": 3, "tasks": [0, 1]}


def _write_memory(state_dir, pairs):
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / MEMORY_FILE).write_text(json.dumps({"format": "trl-lifealign-kl-anchor-memory",
                                                     "format_version": 1, "pairs": pairs}))


def test_kl_anchor_errors_are_clear(tmp_path, tiny_tokenizer, preference_rows):
    from peft import LoraConfig

    from trl_lifealign.tiny import build_tiny_llama

    config = KLAnchorConfig(prompts_per_task=2, max_new_tokens=3)
    state_dir = tmp_path / "kl"
    with pytest.raises(KLAnchorError, match=f"no KL anchor memory at {state_dir / MEMORY_FILE}"):
        load_anchor_memory(state_dir)
    state_dir.mkdir()
    (state_dir / MEMORY_FILE).write_text('{"format": "trl-lifealign-kl-anchor-memory", "pai')
    with pytest.raises(KLAnchorError, match=f"{state_dir / MEMORY_FILE} is truncated"):
        load_anchor_memory(state_dir)
    _write_memory(state_dir, [{"task_index": 0, "prompt_ids": [5, 6, 7], "answer_ids": [8, 9]}])

    # Reference = base (a fresh adapter from peft_config): TRL makes no "ref" adapter.
    anchor = KLAnchorCallback(config, state_dir)
    anchor.start_task(1)
    trainer = FPOTrainer(model=build_tiny_llama(tiny_tokenizer), args=_args(tmp_path),
                         train_dataset=Dataset.from_list(preference_rows[:4]), processing_class=tiny_tokenizer,
                         peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), callbacks=[anchor])
    with pytest.raises(KLAnchorError, match="needs `reference: previous_task`"):
        trainer.train()

    # A plain DPOTrainer never adds auxiliary losses: refused even when bound.
    model = _model(tiny_tokenizer)
    anchor = KLAnchorCallback(config, state_dir)
    anchor.start_task(1)
    trainer = DPOTrainer(model=model, args=_args(tmp_path, DPOConfig),
                         train_dataset=Dataset.from_list(preference_rows[:4]), processing_class=tiny_tokenizer,
                         callbacks=[anchor])
    bind_callbacks(trainer)
    with pytest.raises(KLAnchorError, match="AuxiliaryLossMixin"):
        trainer.train()


# ---------------------------------------------------------------------------------- plain DPOTrainer + the mixin


def test_plain_dpo_trainer_with_the_mixin_runs_ewc_and_the_kl_anchor(tmp_path, tiny_tokenizer, preference_rows):
    class DPOWithAux(AuxiliaryLossMixin, DPOTrainer):
        pass

    model = _model(tiny_tokenizer)
    ewc = EWCCallback(EWCConfig(strength=10.0, fisher_batches=2), tmp_path / "ewc")
    anchor = KLAnchorCallback(KLAnchorConfig(prompts_per_task=2, max_new_tokens=4, batch_size=2), tmp_path / "kl")
    for task in range(2):
        trainer = _train(model, tiny_tokenizer, preference_rows, task, tmp_path, [ewc, anchor],
                         trainer_cls=DPOWithAux, max_steps=2)
        assert _logged(trainer, "ewc/tasks") == [float(task + 1)]
        assert _logged(trainer, "kl_anchor/pairs") == [2.0 * (task + 1)]
    assert len(_logged(trainer, "ewc/penalty")) == 2 and len(_logged(trainer, "kl_anchor/kl")) == 2
    assert _logged(trainer, "kl_anchor/kl")[0] == 0.0
    assert load_ewc_state(tmp_path / "ewc").task_indices == [0, 1]
    assert len(load_anchor_memory(tmp_path / "kl")) == 4
