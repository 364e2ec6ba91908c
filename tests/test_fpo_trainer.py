"""FPOTrainer on real tiny models: equals DPOTrainer at γ=0, equals a hand computation at γ>0 for every kind of
reference TRL supports, logs what DPOTrainer logs plus `fpo/focal_weight`, and trains (full, LoRA, QLoRA)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from _fpo_utils import (
    batch,
    config,
    dataset,
    focal_reference,
    frozen_copy,
    grads,
    perturb_,
    sequence_logps,
    snapshot_params,
    swapped_params,
    zero_grads,
)
from peft import LoraConfig, get_peft_model
from trl import DPOConfig, DPOTrainer

from trl_lifealign.fpo import FPOConfig, FPOTrainer
from trl_lifealign.tiny import build_tiny_llama, train_tokenizer

BETA = 0.5
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")

# A learnable preference that generalizes: "like" beats "hate" whatever the topic. Train and held-out topics differ.
TOPICS = [
    "apples", "rivers", "music", "winter", "books", "trains", "gardens", "coffee", "cats", "stars", "bread", "ships",
]
PAIR_ROWS = [
    {"prompt": f"Tell me about {t}.", "chosen": f"I like {t} a lot.", "rejected": f"I hate {t} a lot."} for t in TOPICS
]
TRAIN_ROWS, HELDOUT_ROWS = PAIR_ROWS[:8], PAIR_ROWS[8:]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([text for row in PAIR_ROWS for text in row.values()], vocab_size=300)


def _model(tokenizer, seed=0):
    return build_tiny_llama(tokenizer, seed=seed)


def _loss_and_grads(trainer, inputs, model):
    zero_grads(model)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), grads(model)


def _assert_grads_close(actual, expected, atol=1e-5, rtol=1e-5):
    assert actual.keys() == expected.keys() and actual
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=rtol, msg=name)


def _moe_model(tokenizer, seed=0):
    """A one-layer Mixtral: DPOTrainer adds its router load-balancing loss, so FPO must too."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.05, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MixtralForCausalLM(cfg).float()


@pytest.mark.parametrize(
    ("fpo_types", "dpo_types", "weights", "builder"),
    [
        (["fpo"], ["sigmoid"], None, _model),
        (["fpo", "sft"], ["sigmoid", "sft"], [1.0, 0.3], _model),
        (["fpo"], ["sigmoid"], None, _moe_model),
    ],
    ids=["fpo", "fpo+sft", "moe-aux-loss"],
)
def test_gamma_zero_equals_dpo_trainer(tmp_path, tokenizer, fpo_types, dpo_types, weights, builder):
    """γ=0 (alone or with 'sft' through loss_weights, and with a MoE aux loss) is TRL's DPO loss: same loss, same
    gradients, same metrics on the same batch."""
    data = dataset(TRAIN_ROWS)
    results = []
    for trainer_cls, cfg_cls, loss_type, extra in (
        (DPOTrainer, DPOConfig, dpo_types, {}),
        (FPOTrainer, FPOConfig, fpo_types, {"focal_gamma": 0.0}),
    ):
        model = builder(tokenizer)
        cfg = config(tmp_path / trainer_cls.__name__, cfg_cls, loss_type=loss_type, loss_weights=weights, **extra)
        trainer = trainer_cls(
            model=model, ref_model=builder(tokenizer, seed=1), args=cfg, train_dataset=data, processing_class=tokenizer
        )
        loss, model_grads = _loss_and_grads(trainer, batch(trainer), model)
        results.append((loss, model_grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}))
    (dpo_loss, dpo_grads, dpo_metrics), (fpo_loss_value, fpo_grads, fpo_metrics) = results
    torch.testing.assert_close(fpo_loss_value, dpo_loss, atol=1e-5, rtol=1e-5)
    _assert_grads_close(fpo_grads, dpo_grads)
    assert fpo_metrics.pop("fpo/focal_weight") == 1.0
    assert fpo_metrics.keys() == dpo_metrics.keys()
    for key, value in dpo_metrics.items():
        assert fpo_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize(
    ("loss_type", "weights"),
    [(["fpo"], None), (["fpo", "sft"], [1.0, 0.7]), (["fpo", "sigmoid"], [0.6, 0.4])],
)
def test_focal_loss_matches_hand_computation(tmp_path, tokenizer, loss_type, weights):
    """γ=2 with an explicit ref_model: loss and gradients equal the plain-PyTorch focal loss (+ weighted extras)."""
    model, ref = _model(tokenizer), _model(tokenizer, seed=1)
    cfg = config(tmp_path, loss_type=loss_type, loss_weights=weights, focal_gamma=2.0, beta=BETA)
    trainer = FPOTrainer(
        model=model, ref_model=ref, args=cfg, train_dataset=dataset(TRAIN_ROWS), processing_class=tokenizer
    )
    inputs = batch(trainer)
    loss, trainer_grads = _loss_and_grads(trainer, inputs, model)

    zero_grads(model)
    chosen, rejected = sequence_logps(model, inputs)
    with torch.no_grad():
        ref_chosen, ref_rejected = sequence_logps(ref, inputs)
    focal = focal_reference(chosen - ref_chosen, rejected - ref_rejected, BETA, 2.0).mean()
    dpo = -torch.log(torch.sigmoid(BETA * ((chosen - ref_chosen) - (rejected - ref_rejected)))).mean()
    chosen_tokens = inputs["completion_mask"][:, 1:].chunk(2)[0].sum()
    sft = -chosen.sum() / chosen_tokens  # mean NLL over the chosen completion tokens
    parts = {"fpo": focal, "sft": sft, "sigmoid": dpo}
    expected = sum(w * parts[t] for t, w in zip(loss_type, weights or [1.0]))
    expected.backward()

    torch.testing.assert_close(loss, expected.detach(), atol=1e-5, rtol=1e-5)
    _assert_grads_close(trainer_grads, grads(model))
    # Sanity: FPO differs from DPO on this batch (the test would not tell them apart otherwise).
    assert abs(focal.item() - dpo.item()) > 1e-3


def _fpo_by_hand(policy, ref, inputs, gamma=2.0, beta=BETA):
    with torch.no_grad():
        chosen, rejected = sequence_logps(policy, inputs)
        ref_chosen, ref_rejected = sequence_logps(ref, inputs)
    return focal_reference(chosen - ref_chosen, rejected - ref_rejected, beta, gamma).mean()


def _eval_loss(trainer, inputs):
    trainer.model.eval()
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, inputs).detach()


def test_reference_peft_adapter_disabled(tmp_path, tokenizer):
    """New LoRA adapter: the reference is the base model with adapters disabled."""
    model = _model(tokenizer)
    base = frozen_copy(model)
    trainer = FPOTrainer(
        model=model, args=config(tmp_path), train_dataset=dataset(TRAIN_ROWS), processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )
    perturb_(trainer.model, "lora_B.default", seed=3)  # move the policy away from the base
    inputs = batch(trainer)
    expected = _fpo_by_hand(trainer.model, base, inputs)
    torch.testing.assert_close(_eval_loss(trainer, inputs), expected, atol=1e-5, rtol=1e-5)
    assert abs(expected.item() - 0.25 * torch.log(torch.tensor(2.0)).item()) > 1e-3  # not the z=0 value


def test_reference_trl_ref_adapter_from_existing_peft_model(tmp_path, tokenizer):
    """Existing PeftModel: the reference is TRL's frozen 'ref' copy of the adapter at trainer construction, also for
    a second trainer on the same model (peft >= 0.21 would refuse the second 'ref' adapter)."""
    peft_model = get_peft_model(_model(tokenizer), LoraConfig(**LORA))
    for round_seed in (1, 2):
        perturb_(peft_model, "lora_B.default", seed=round_seed)
        adapter_at_construction = snapshot_params(peft_model, ".default.")
        trainer = FPOTrainer(
            model=peft_model, args=config(tmp_path / str(round_seed)), train_dataset=dataset(TRAIN_ROWS),
            processing_class=tokenizer,
        )
        assert "ref" in peft_model.peft_config
        perturb_(peft_model, "lora_B.default", seed=10 + round_seed)  # the policy moves, the 'ref' copy must not
        inputs = batch(trainer)
        with torch.no_grad():
            chosen, rejected = sequence_logps(peft_model, inputs)
            with swapped_params(peft_model, adapter_at_construction):
                ref_chosen, ref_rejected = sequence_logps(peft_model, inputs)
        expected = focal_reference(chosen - ref_chosen, rejected - ref_rejected, BETA, 2.0).mean()
        torch.testing.assert_close(_eval_loss(trainer, inputs), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(chosen, ref_chosen)
        trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
        assert trainable and all(".default." in n for n in trainable)


def test_reference_precomputed_log_probs(tmp_path, tokenizer):
    """precompute_ref_log_probs: the dataset carries the reference log-probs of the model at construction."""
    model = _model(tokenizer)
    initial = frozen_copy(model)
    trainer = FPOTrainer(
        model=model, args=config(tmp_path, precompute_ref_log_probs=True), train_dataset=dataset(TRAIN_ROWS),
        processing_class=tokenizer,
    )
    assert "ref_chosen_logps" in trainer.train_dataset.column_names and trainer.ref_model is None
    perturb_(model, "self_attn.q_proj", seed=4, scale=0.5)
    inputs = batch(trainer)
    assert "ref_chosen_logps" in inputs
    expected = _fpo_by_hand(model, initial, inputs)
    torch.testing.assert_close(_eval_loss(trainer, inputs), expected, atol=1e-5, rtol=1e-5)


def _train_and_evaluate(trainer):
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    return before, after


def test_training_raises_heldout_reward_accuracy_and_logs_like_dpo(tmp_path, tokenizer):
    """Full fine-tuning: held-out reward accuracy rises; logs hold every DPOTrainer key plus fpo/focal_weight."""
    cfg_kwargs = dict(max_steps=4, learning_rate=5e-3, eval_strategy="no")
    trainer = FPOTrainer(
        model=_model(tokenizer), ref_model=_model(tokenizer), args=config(tmp_path / "fpo", **cfg_kwargs),
        train_dataset=dataset(TRAIN_ROWS), eval_dataset=dataset(HELDOUT_ROWS), processing_class=tokenizer,
    )
    before, after = _train_and_evaluate(trainer)
    assert before["eval_rewards/accuracies"] == 0.0  # policy == reference: no pair is preferred yet
    assert after["eval_rewards/accuracies"] == 1.0 and after["eval_rewards/margins"] > 0
    assert 0.0 < after["eval_fpo/focal_weight"] < before["eval_fpo/focal_weight"] == pytest.approx(0.25)

    dpo = DPOTrainer(
        model=_model(tokenizer), ref_model=_model(tokenizer), args=config(tmp_path / "dpo", DPOConfig, **cfg_kwargs),
        train_dataset=dataset(TRAIN_ROWS), eval_dataset=dataset(HELDOUT_ROWS), processing_class=tokenizer,
    )
    dpo_before, _ = _train_and_evaluate(dpo)
    train_keys = lambda t: {k for entry in t.state.log_history if "loss" in entry for k in entry}
    assert train_keys(dpo) <= train_keys(trainer)
    assert "fpo/focal_weight" in train_keys(trainer)
    assert set(dpo_before) - {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second"} <= set(before)
    assert "eval_fpo/focal_weight" in before and "eval_fpo/focal_weight" in trainer.state.log_history[-1]


def test_lora_trains(tmp_path, tokenizer):
    trainer = FPOTrainer(
        model=_model(tokenizer), args=config(tmp_path, max_steps=4, learning_rate=2e-2),
        train_dataset=dataset(TRAIN_ROWS), eval_dataset=dataset(HELDOUT_ROWS), processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )
    before, after = _train_and_evaluate(trainer)
    assert after["eval_rewards/accuracies"] > before["eval_rewards/accuracies"]
    assert after["eval_loss"] < before["eval_loss"]


@pytest.mark.bnb
def test_qlora_4bit_trains(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # bitsandbytes' CPU 4-bit kernels work in blocks of 64 input features: hidden size 64 is the smallest that fits.
    build_tiny_llama(tokenizer, hidden_size=64).save_pretrained(tmp_path / "tiny")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "tiny", quantization_config=quantization, dtype=torch.float32
    )
    assert getattr(model, "is_loaded_in_4bit", False)
    trainer = FPOTrainer(
        model=model, args=config(tmp_path, max_steps=4, learning_rate=2e-2), train_dataset=dataset(TRAIN_ROWS),
        eval_dataset=dataset(HELDOUT_ROWS), processing_class=tokenizer, peft_config=LoraConfig(**LORA),
    )
    # No evaluate() before train() here: with a 4-bit model on CPU, TRL's DPOTrainer itself then trains with zero
    # gradients (grad_norm 0.0, reproduced with trl.DPOTrainer). A fresh adapter equals the reference anyway, so
    # the starting reward accuracy is 0 by construction (checked on the first logged step).
    trainer.train()
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert steps[0]["rewards/margins"] == 0.0 and steps[-1]["grad_norm"] > 0
    after = trainer.evaluate()
    assert after["eval_rewards/accuracies"] > 0.0 and after["eval_rewards/margins"] > 0
    assert after["eval_loss"] < 0.25 * torch.log(torch.tensor(2.0)).item()  # below the z=0 value


def test_eval_with_compute_metrics_returns_logits(tmp_path, tokenizer):
    """`return_outputs=True` (prediction_step with compute_metrics) hands logits to compute_metrics."""
    seen = {}

    def compute_metrics(prediction):
        seen["shape"] = prediction.predictions.shape
        return {"rows": float(prediction.predictions.shape[0])}

    trainer = FPOTrainer(
        model=_model(tokenizer), ref_model=_model(tokenizer, seed=1), args=config(tmp_path),
        train_dataset=dataset(TRAIN_ROWS), eval_dataset=dataset(HELDOUT_ROWS), processing_class=tokenizer,
        compute_metrics=compute_metrics,
    )
    metrics = trainer.evaluate()
    assert metrics["eval_rows"] == 2 * len(HELDOUT_ROWS) and seen["shape"][-1] == len(tokenizer)
    assert "eval_fpo/focal_weight" in metrics


@dataclass
class _PlainDPOConfigWithGamma(DPOConfig):
    """What Axolotl builds: its own DPOConfig subclass with a `focal_gamma` field from the plugin's mixin."""

    focal_gamma: float = field(default=1.0, metadata={"help": "focal exponent"})


def test_plain_dpo_config_with_focal_gamma(tmp_path, tokenizer):
    cfg = config(tmp_path, _PlainDPOConfigWithGamma, loss_type=["fpo"], focal_gamma=1.0)
    trainer = FPOTrainer(
        model=_model(tokenizer), ref_model=_model(tokenizer, seed=1), args=cfg, train_dataset=dataset(TRAIN_ROWS),
        processing_class=tokenizer,
    )
    assert trainer.focal_gamma == 1.0
    inputs = batch(trainer)
    expected = _fpo_by_hand(trainer.model, trainer.ref_model, inputs, gamma=1.0)
    torch.testing.assert_close(_eval_loss(trainer, inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "field_name"),
    [({"loss_type": ["fpo"], "focal_gamma": -1.0}, "focal_gamma"), ({"loss_type": ["sigmoid"]}, "loss_type"),
     ({"loss_type": ["fpo"], "use_weighting": True}, "use_weighting")],
)
def test_trainer_refuses_bad_plain_config_before_any_work(tmp_path, tokenizer, overrides, field_name):
    cfg = config(tmp_path, _PlainDPOConfigWithGamma, **overrides)
    with pytest.raises(ValueError, match=field_name):
        # A model path that does not exist: validation must fire before DPOTrainer tries to load anything.
        FPOTrainer(model=str(tmp_path / "missing"), args=cfg, train_dataset=dataset(TRAIN_ROWS))
