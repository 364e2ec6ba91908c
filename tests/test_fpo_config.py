"""FPOConfig: defaults, TRL-style metadata, CLI parsing, and every refused option raising at construction."""

from __future__ import annotations

import dataclasses

import pytest
from trl import DPOConfig, DPOTrainer, TrlParser

from trl_lifealign.fpo import FPOConfig


def _config(tmp_path, **overrides):
    return FPOConfig(output_dir=str(tmp_path), bf16=False, report_to="none", **overrides)


def test_defaults_and_metadata(tmp_path):
    cfg = _config(tmp_path)
    assert isinstance(cfg, DPOConfig) and dataclasses.is_dataclass(cfg)
    assert cfg.focal_gamma == 2.0 and cfg.loss_type == ["fpo"]
    fields = {f.name: f for f in dataclasses.fields(FPOConfig)}
    assert fields["focal_gamma"].metadata["help"] and fields["loss_type"].metadata["help"]


@pytest.mark.parametrize(
    ("loss_type", "loss_weights"),
    [("fpo", None), (["fpo"], [0.5]), (["fpo", "sft"], [1.0, 0.2]), (["sigmoid", "fpo"], [0.5, 0.5])],
)
def test_accepted_loss_combinations(tmp_path, loss_type, loss_weights):
    cfg = _config(tmp_path, loss_type=loss_type, loss_weights=loss_weights, focal_gamma=0.0)
    assert "fpo" in cfg.loss_type


REFUSED = [
    ({"focal_gamma": -0.5}, "focal_gamma"),
    ({"focal_gamma": float("nan")}, "focal_gamma"),
    ({"focal_gamma": float("inf")}, "focal_gamma"),
    ({"loss_type": ["sigmoid"]}, "loss_type"),
    ({"loss_type": ["fpo", "ipo"]}, "loss_type"),
    ({"loss_type": ["fpo", "hinge", "sft"]}, "loss_type"),
    ({"loss_type": ["fpo", "fpo"]}, "loss_type"),
    ({"loss_type": ["fpo", "sft"], "loss_weights": [1.0]}, "loss_weights"),
    ({"loss_type": ["fpo", "sft"], "loss_weights": [1.0, float("nan")]}, "loss_weights"),
    ({"ld_alpha": 0.5}, "ld_alpha"),
    ({"use_weighting": True}, "use_weighting"),
    ({"f_divergence_type": "forward_kl"}, "f_divergence_type"),
    ({"f_divergence_type": "js_divergence"}, "f_divergence_type"),
    ({"f_divergence_type": "alpha_divergence"}, "f_divergence_type"),
    ({"label_smoothing": 0.1}, "label_smoothing"),
]


@pytest.mark.parametrize(("overrides", "field_name"), REFUSED)
def test_refused_options_raise_naming_the_field(tmp_path, overrides, field_name):
    with pytest.raises(ValueError, match=field_name):
        _config(tmp_path, **overrides)


def test_liger_refused_only_where_it_bypasses_the_loss(tmp_path):
    if hasattr(DPOTrainer, "_compute_loss_liger"):  # trl <= 1.9: the Liger path never calls _compute_loss
        with pytest.raises(ValueError, match="use_liger_kernel"):
            _config(tmp_path, use_liger_kernel=True)
    else:  # later trl: Liger only patches layer kernels, the loss still goes through FPO
        assert _config(tmp_path, use_liger_kernel=True).use_liger_kernel


def test_trl_parser_reads_fpo_fields(tmp_path):
    parser = TrlParser((FPOConfig,))
    (cfg,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--bf16", "false", "--report_to", "none", "--focal_gamma", "1.5",
         "--loss_type", "fpo", "sft", "--loss_weights", "1.0", "0.1"]
    )
    assert cfg.focal_gamma == 1.5 and cfg.loss_type == ["fpo", "sft"] and cfg.loss_weights == [1.0, 0.1]
    with pytest.raises(ValueError, match="focal_gamma"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--bf16", "false", "--focal_gamma", "-1"])
