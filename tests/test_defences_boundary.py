"""The boundary defences (model averaging, forgetting budget, O-LoRA, adapter merging) on tiny real LoRA models with
FPOTrainer (and TRL's DPOTrainer), checked exactly against their math from values another callback records."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _slmc_utils import FactorRecorder, lora_factors, reference_sequence, rel_err, task_dataset, tiny_lora_model

from trl_lifealign.adapters import adapter_state, drop_ref_adapter, load_adapter_file, load_adapter_state
from trl_lifealign.defences.averaging.callback import ModelAveragingCallback, lora_pairs, update_norm
from trl_lifealign.defences.averaging.math import interpolate, interpolate_lowrank_product
from trl_lifealign.defences.budget import callback as budget_module
from trl_lifealign.defences.budget.callback import ForgettingBudgetCallback
from trl_lifealign.defences.budget.math import largest_step_within_budget
from trl_lifealign.defences.config import AveragingConfig, ForgettingBudgetConfig, MergingConfig, OLoRAConfig
from trl_lifealign.defences.merging.callback import AdapterMergingCallback, peft_merged_factors
from trl_lifealign.defences.olora.callback import OLoRACallback, load_olora_model
from trl_lifealign.distributed import UnsupportedShardingError
from trl_lifealign.lifelong.evaluation import EvalSet, evaluate_preferences, initial_policy_logps, prepare_eval_sets
from trl_lifealign.slmc import MemoryConsolidationCallback

SCALING = 2.0  # tiny_lora_model: lora_alpha 8 / r 4


def _args(tmp_path, name, dpo=False):
    from trl import DPOConfig

    from trl_lifealign.fpo import FPOConfig

    values = dict(output_dir=str(tmp_path / name), bf16=False, use_cpu=True, report_to=[],
                  per_device_train_batch_size=4, max_steps=2, learning_rate=5e-2, logging_steps=1, save_strategy="no",
                  beta=0.5, disable_tqdm=True, seed=0, max_length=64)
    return (DPOConfig if dpo else FPOConfig)(**values)


def _train(model, tokenizer, rows, task, callbacks, tmp_path, trainer_cls=None, drop_ref=False):
    """One task: a fresh trainer on task ``task``'s rows; returns it after ``train()``."""
    from trl_lifealign.fpo import FPOTrainer

    trainer = (trainer_cls or FPOTrainer)(model=model, args=_args(tmp_path, f"t{task}", dpo=trainer_cls is not None),
                                          train_dataset=task_dataset(rows, task), processing_class=tokenizer,
                                          callbacks=list(callbacks))
    if drop_ref:
        drop_ref_adapter(model)
    trainer.train()
    return trainer


def _logged(trainer, key) -> list[float]:
    return [float(entry[key]) for entry in trainer.state.log_history if key in entry]


def _delta_w(factors, path, scaling=SCALING):
    a = factors[f"{path}.lora_A.default.weight"].double()
    b = factors[f"{path}.lora_B.default.weight"].double()
    return scaling * b @ a


# --------------------------------------------------------------------------------------------------- averaging


def test_averaging_factors_per_layer_matches_the_math(tmp_path, tiny_tokenizer, preference_rows):
    model = tiny_lora_model(tiny_tokenizer)
    recorder = FactorRecorder()
    averaging = ModelAveragingCallback(AveragingConfig(alpha=0.5, per_layer={"1": 0.25}, space="factors"))
    trainers = [_train(model, tiny_tokenizer, preference_rows, task, [recorder, averaging], tmp_path)
                for task in range(2)]
    after = [recorder.begin[1], lora_factors(model)]
    for task in range(2):
        start, trained = recorder.begin[task], recorder.end[task]
        for name, value in after[task].items():
            alpha = 0.25 if ".layers.1." in name else 0.5
            assert torch.equal(value, interpolate(start[name], trained[name], alpha)), (task, name)
            assert not torch.equal(value, trained[name])
        logged = {key: _logged(trainers[task], f"averaging/{key}") for key in
                  ("alpha_mean", "update_norm_before", "update_norm_after", "refactor_error")}
        assert logged["alpha_mean"] == [0.375] and logged["refactor_error"] == [0.0]
        paths = lora_pairs(trained)
        expected = math.sqrt(sum(float(((_delta_w(trained, p) - _delta_w(start, p)) ** 2).sum()) for p in paths))
        assert logged["update_norm_before"][0] == pytest.approx(expected, rel=1e-6)
        assert 0 < logged["update_norm_after"][0] < logged["update_norm_before"][0]


def test_averaging_in_product_space_then_slmc_consolidates_the_averaged_update(tmp_path, tiny_tokenizer,
                                                                               preference_rows):
    theta, lam = 0.6, 0.3
    model = tiny_lora_model(tiny_tokenizer)
    recorder = FactorRecorder()
    averaging = ModelAveragingCallback(AveragingConfig(alpha=0.5, space="product"))
    slmc = MemoryConsolidationCallback(tmp_path / "memory", energy_threshold=theta, overlap_weight=lam)
    trainer = _train(model, tiny_tokenizer, preference_rows, 0, [recorder, averaging, slmc], tmp_path)
    start, trained, final = recorder.begin[0], recorder.end[0], lora_factors(model)
    errors = []
    for a_name, b_name in lora_pairs(trained).values():
        a, b, error = interpolate_lowrank_product(start[a_name], start[b_name], trained[a_name], trained[b_name], 0.5)
        errors.append(error)
        for name, averaged in ((a_name, a), (b_name, b)):
            denoised = reference_sequence([(averaged - start[name]).double().numpy()], theta, lam)[0]
            expected = start[name].double().numpy() + denoised
            assert rel_err(final[name].numpy(), expected) < 1e-5, name
            # The other order (SLMC first, then averaging) gives a different adapter: the test can tell them apart.
            first_slmc = start[name] + torch.from_numpy(
                reference_sequence([(trained[name] - start[name]).double().numpy()], theta, lam)[0]).float()
            assert rel_err(final[name].numpy(), first_slmc.numpy()) > 1e-3, name
    assert _logged(trainer, "averaging/refactor_error")[0] == pytest.approx(sum(errors) / len(errors), abs=1e-6)
    assert sum(errors) > 0 and len(_logged(trainer, "slmc/conflict")) == 1


def test_averaging_alpha_one_is_bit_identical_with_trl_dpo_trainer(tmp_path, tiny_tokenizer, preference_rows):
    from trl import DPOTrainer

    from trl_lifealign import callbacks
    from trl_lifealign.defences.base import AuxiliaryLossMixin

    class MixedDPO(AuxiliaryLossMixin, DPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            callbacks.bind_callbacks(self)

    model = tiny_lora_model(tiny_tokenizer)
    recorder = FactorRecorder()
    averaging = ModelAveragingCallback(AveragingConfig(alpha=1.0, space="product"))
    trainer = _train(model, tiny_tokenizer, preference_rows, 0, [recorder, averaging], tmp_path, trainer_cls=MixedDPO)
    assert averaging.trainer is trainer
    for name, value in lora_factors(model).items():
        assert torch.equal(value, recorder.end[0][name]) and not torch.equal(value, recorder.begin[0][name])
    assert _logged(trainer, "averaging/alpha_mean") == [1.0]
    before, after = _logged(trainer, "averaging/update_norm_before"), _logged(trainer, "averaging/update_norm_after")
    assert before == after and before[0] > 0


# ------------------------------------------------------------------------------------------------------ budget


def _monitor(tokenizer, model, rows):
    sets = prepare_eval_sets(tokenizer, [EvalSet("t0", rows[:4]), EvalSet("t1", rows[4:])], max_length=64)
    return sets, initial_policy_logps(model, sets)


def test_budget_search_and_adapter_follow_the_math(tmp_path, tiny_tokenizer, preference_rows, monkeypatch):
    """Synthetic scores: the own task scores 70 + 10x, the earlier one 90 - 20x, x = progress along the update."""
    model = tiny_lora_model(tiny_tokenizer)
    sets, initial = _monitor(tiny_tokenizer, model, preference_rows)
    recorder = FactorRecorder()
    config = ForgettingBudgetConfig(budget=3.0, max_evaluations=6, space="factors")
    budget = ForgettingBudgetCallback(config, sets, initial, tmp_path / "budget")

    def fake_scores(scored_model, monitor_sets, initial_logps, batch_size=8):
        current, start, trained = lora_factors(scored_model), recorder.begin[-1], recorder.end[-1]
        dot = sum(float(((current[n] - start[n]).double() * (trained[n] - start[n]).double()).sum()) for n in start)
        x = dot / sum(float(((trained[n] - start[n]).double() ** 2).sum()) for n in start)
        return [70 + 10 * x if s.name == f"t{budget.task_index}" else 90 - 20 * x for s in monitor_sets]

    monkeypatch.setattr(budget_module, "monitor_scores", fake_scores)
    trainers = []
    for task in range(2):
        budget.start_task(task)
        trainers.append(_train(model, tiny_tokenizer, preference_rows, task, [recorder, budget], tmp_path))
        if task == 0:
            assert budget.summary() == {"task": 0, "alpha": 1.0, "reachable": True, "drops": [], "evaluations": 0}
            assert budget.references() == {0: pytest.approx(80.0)}
    expected = largest_step_within_budget(lambda alpha: [90 - 20 * alpha], [80.0], 3.0, 6)
    summary = budget.summary()
    assert expected.alpha == 0.625 and summary["alpha"] == expected.alpha and summary["reachable"]
    assert summary["drops"] == pytest.approx(expected.drops, abs=1e-4) and summary["evaluations"] == 6
    start, trained = recorder.begin[1], recorder.end[1]
    for name, value in lora_factors(model).items():
        assert torch.equal(value, interpolate(start[name], trained[name], expected.alpha)), name
    assert budget.references() == {0: pytest.approx(80.0), 1: pytest.approx(76.25, abs=1e-4)}
    assert _logged(trainers[1], "budget/alpha") == [0.625]
    assert _logged(trainers[1], "budget/max_drop")[0] == pytest.approx(2.5, abs=1e-4)
    history = json.loads((tmp_path / "budget" / "references.json").read_text())["history"]
    assert [h["task"] for h in history] == [0, 1]


def test_budget_real_scores_and_listed_last(tmp_path, tiny_tokenizer, preference_rows):
    model = tiny_lora_model(tiny_tokenizer)
    sets, initial = _monitor(tiny_tokenizer, model, preference_rows)
    budget = ForgettingBudgetCallback(ForgettingBudgetConfig(budget=1.0, max_evaluations=4), sets, initial,
                                      tmp_path / "budget")
    for task in range(2):
        budget.start_task(task)
        _train(model, tiny_tokenizer, preference_rows, task, [budget], tmp_path)
    references, summary = budget.references(), budget.summary()
    scores = [100 * row["accuracy"] for row in evaluate_preferences(model, sets, initial)]
    assert summary["drops"] == pytest.approx([references[0] - scores[0]], abs=1e-9)
    assert references[1] == pytest.approx(scores[1], abs=1e-9) and 1 <= summary["evaluations"] <= 4
    if summary["reachable"]:
        assert max(summary["drops"]) <= 1.0
    budget.start_task(1)
    with pytest.raises(ValueError, match="must be the last boundary callback"):
        _train(model, tiny_tokenizer, preference_rows, 1, [budget, ModelAveragingCallback()], tmp_path)


# ------------------------------------------------------------------------------------------------------- O-LoRA


class _AllAdapters:
    """Records every adapter's factors at train begin and after the last step (listed first)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Recorder(TrainerCallback):
            begin, end = [], []

            def on_train_begin(self, args, state, control, model=None, **kwargs):
                self.begin.append(_all_factors(model))

            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step >= state.max_steps:
                    self.end.append(_all_factors(model))

        recorder = _Recorder()
        recorder.begin, recorder.end = [], []
        return recorder


def _all_factors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}


def _logits(model, tokenizer):
    ids = tokenizer(["What colour is the sky? The sky is blue."], return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_olora_trains_only_the_new_adapter_and_reloads(tmp_path, tiny_tokenizer, preference_rows):
    from trl_lifealign.tiny import build_tiny_llama

    model = tiny_lora_model(tiny_tokenizer)
    olora = OLoRACallback(OLoRAConfig(orthogonality=0.5), model.peft_config["default"], tmp_path / "olora")
    recorder = _AllAdapters()
    trainers = []
    for task in range(3):
        olora.prepare_model(model, task)
        trainers.append(_train(model, tiny_tokenizer, preference_rows, task, [recorder, olora], tmp_path,
                               drop_ref=True))
    assert set(model.peft_config) == {"default", "task0", "task1"} and model.active_adapters == ["task0", "task1",
                                                                                                  "default"]
    begin, end = recorder.begin[2], recorder.end[2]
    for name in begin:
        changed = not torch.equal(begin[name], end[name])
        assert changed == (".default." in name), name
    for task, earlier in ((1, "task0"), (2, "task1")):  # the finished adapter is frozen as is; default starts anew
        for name, value in recorder.end[task - 1].items():
            if ".default." in name:
                assert torch.equal(recorder.begin[task][name.replace(".default.", f".{earlier}.")], value)
                if ".lora_B." in name:
                    assert not recorder.begin[task][name].any()
    assert all(p.grad is None for n, p in model.named_parameters() if ".task" in n)
    expected = sum(float(((begin[a].double() @ begin[a.replace(".default.", f".task{i}.")].double().T) ** 2).sum())
                   for a in begin if ".lora_A.default." in a for i in range(2))
    assert _logged(trainers[2], "olora/penalty")[0] == pytest.approx(expected, rel=1e-5)
    assert _logged(trainers[0], "olora/penalty") == [] and _logged(trainers[2], "olora/adapters") == [3.0]
    assert olora.summary()["parameters_per_task"] == sum(v.numel() for n, v in end.items() if ".default." in n)

    logits = _logits(model, tiny_tokenizer)
    reloaded = load_olora_model(build_tiny_llama(tiny_tokenizer, seed=0), tmp_path / "olora")
    assert torch.allclose(_logits(reloaded, tiny_tokenizer), logits, atol=1e-6)
    resumed, again = tiny_lora_model(tiny_tokenizer, seed=0), OLoRACallback(OLoRAConfig(), state_dir=tmp_path / "x")
    assert again.load(resumed, tmp_path / "olora") == 2
    assert torch.allclose(_logits(resumed, tiny_tokenizer), logits, atol=1e-6)

    with pytest.raises(ValueError, match="'ref' adapter"):
        _train(model, tiny_tokenizer, preference_rows, 2, [olora], tmp_path)


def test_refused_under_deepspeed(tmp_path, tiny_tokenizer, monkeypatch):
    model = tiny_lora_model(tiny_tokenizer)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UnsupportedShardingError, match="OLoRACallback does not support DeepSpeed"):
        OLoRACallback().prepare_model(model, 0)
    with pytest.raises(UnsupportedShardingError, match="AdapterMergingCallback does not support DeepSpeed"):
        AdapterMergingCallback(MergingConfig(), tmp_path / "m")._check_model(model)


# ------------------------------------------------------------------------------------------------------ merging


def test_merging_equals_peft_add_weighted_adapter(tmp_path, tiny_tokenizer, preference_rows):
    model = tiny_lora_model(tiny_tokenizer)
    recorder = FactorRecorder()
    merging = AdapterMergingCallback(MergingConfig(method="ties", density=0.5), tmp_path / "merge")
    trainers = []
    for task in range(2):
        merging.start_task(task)
        trainers.append(_train(model, tiny_tokenizer, preference_rows, task, [recorder, merging], tmp_path))
    assert all(torch.equal(recorder.begin[1][n], v) for n, v in recorder.end[0].items())  # one task: no merge
    assert _logged(trainers[0], "merging/tasks") == [1.0] and _logged(trainers[1], "merging/tasks") == [2.0]
    states = [load_adapter_file(tmp_path / "merge" / f"task{t}.safetensors") for t in range(2)]
    for name, value in recorder.end[1].items():  # the stored adapter is the trained one
        key = name.replace(".default.", ".")
        assert torch.equal(states[1][key], value)

    direct = tiny_lora_model(tiny_tokenizer)
    for name, state in zip(("first", "second"), states):
        direct.add_adapter(name, direct.peft_config["default"])
        load_adapter_state(direct, state, name)
    direct.add_weighted_adapter(["first", "second"], [1.0, 1.0], "m", combination_type="ties", density=0.5)
    merged = {n: p.detach() for n, p in direct.named_parameters() if ".m." in n}
    final = lora_factors(model)
    for path in lora_pairs(final):
        expected = merged[f"{path}.lora_B.m.weight"].double() @ merged[f"{path}.lora_A.m.weight"].double()
        assert rel_err(_delta_w(final, path).numpy(), expected.numpy()) < 1e-6, path
    direct.set_adapter("m")
    assert torch.allclose(_logits(direct, tiny_tokenizer), _logits(model, tiny_tokenizer), atol=1e-6)
    assert set(model.peft_config) == {"default", "ref"} and model.active_adapters == ["default"]
    assert all(p.requires_grad for n, p in model.named_parameters() if ".default." in n)

    # linear with weights 1/n²: two identical adapters merge to themselves (each factor is the mean).
    state = adapter_state(model)
    same = peft_merged_factors(model, [state, state], "linear", None)
    for name, value in lora_factors(model).items():
        assert torch.allclose(same[name], value, atol=1e-6), name
    assert set(model.peft_config) == {"default", "ref"}
    paths = lora_pairs(final)
    assert _logged(trainers[1], "merging/update_norm")[0] == pytest.approx(
        update_norm(recorder.end[1], final, paths, dict.fromkeys(paths, SCALING)), rel=1e-6)


def test_merging_refuses_another_layout(tmp_path, tiny_tokenizer, preference_rows):
    merging = AdapterMergingCallback(MergingConfig(method="linear"), tmp_path / "merge")
    merging.store(tiny_lora_model(tiny_tokenizer), 0)
    with pytest.raises(ValueError, match="LoRA layout"):
        merging._check_model(tiny_lora_model(tiny_tokenizer, rank=2))
    assert sorted(json.loads((tmp_path / "merge" / "manifest.json").read_text())["tasks"]) == ["0"]
