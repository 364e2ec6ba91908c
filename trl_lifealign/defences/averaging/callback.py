"""``ModelAveragingCallback``: at each task boundary the adapter becomes ``start + α·(trained − start)`` (see ``math``).

The plumbing around the pure math: the default adapter's factors are snapshotted when training begins (the task's
start) and, right after the last optimizer step, replaced by the interpolation, module by module, with α per decoder
layer (:func:`~trl_lifealign.defences.averaging.math.layer_alphas`). Every rank reads the full factors, computes the
same values and writes them back (:func:`~trl_lifealign.defences.base.write_factors`), so DeepSpeed ZeRO-3 and FSDP2
work unchanged.

Order matters at a boundary: listed *before* ``MemoryConsolidationCallback`` in a trainer's callbacks, SLMC then
consolidates the averaged update (both act after the last step, in list order).

The helpers (:func:`lora_pairs`, :func:`interpolate_adapter`, :func:`update_norm`, ...) are shared with the
forgetting-budget callback, which searches the same interpolation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ...adapters import DEFAULT_ADAPTER
from ..base import TaskBoundaryCallback, is_last_step, read_factors, write_factors
from ..config import AveragingConfig
from .math import interpolate, interpolate_lowrank_product, layer_alphas

__all__ = ["ModelAveragingCallback", "check_lora_adapter", "interpolate_adapter", "lora_pairs", "lora_scalings",
           "update_norm"]

_A_MARKERS = (".lora_A.", ".lora_embedding_A.")


def check_lora_adapter(model, adapter: str, what: str):
    """``adapter``'s ``LoraConfig``, or a ``ValueError`` saying why ``what`` cannot act on it (no PEFT model, no such
    adapter, not LoRA, DoRA: its magnitude vector is not a LoRA factor and would be left behind)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or adapter not in configs:
        found = sorted(configs) if isinstance(configs, dict) else "no PEFT adapters"
        raise ValueError(f"{what} needs a PEFT LoRA model with a {adapter!r} adapter; {type(model).__name__} has "
                         f"{found}")
    config = configs[adapter]
    if str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
        raise ValueError(f"{what}: adapter {adapter!r} is {config.peft_type}, not LoRA")
    if getattr(config, "use_dora", False):
        raise ValueError(f"{what} does not support DoRA (use_dora=True): the magnitude vector is not a LoRA factor")
    return config


def lora_pairs(names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """``{module path: (lora_A name, lora_B name)}`` for factor names as :func:`read_factors` returns them."""
    names = list(names)
    present = set(names)
    pairs = {}
    for name in names:
        marker = next((m for m in _A_MARKERS if m in name), None)
        if marker is None:
            continue
        partner = name.replace(marker, marker.replace("_A.", "_B."), 1)
        if partner not in present:
            raise ValueError(f"LoRA factor {name} has no matching {partner}")
        pairs[name.split(marker)[0]] = (name, partner)
    if 2 * len(pairs) != len(present):
        raise ValueError(f"{len(present) - 2 * len(pairs)} LoRA factor(s) have no lora_A/lora_B partner")
    return pairs


def lora_scalings(model, pairs: Mapping[str, tuple[str, str]], adapter: str = DEFAULT_ADAPTER) -> dict[str, float]:
    """``{module path: LoRA scaling s}`` (ΔW = s·B·A) of every module in ``pairs``."""
    return {path: float(model.get_submodule(path).scaling[adapter]) for path in pairs}


def interpolate_adapter(start: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor],
                        alphas: Mapping[str, float] | float, space: str,
                        pairs: Mapping[str, tuple[str, str]] | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """``(factor values, mean relative truncation error)`` of ``start + α·(trained − start)``, α per module path.

    ``space="factors"`` interpolates each factor; ``"product"`` interpolates ΔW exactly and re-factorises it to rank
    r (the error is that of the truncation, averaged over the modules re-factorised). α = 1 returns the trained
    factors and α = 0 the start ones unchanged, bit for bit, in both spaces.
    """
    if space not in ("product", "factors"):
        raise ValueError(f"space: expected 'product' or 'factors', got {space!r}")
    pairs = lora_pairs(trained) if pairs is None else pairs
    values: dict[str, torch.Tensor] = {}
    errors = []
    for path, (a_name, b_name) in pairs.items():
        alpha = float(alphas if isinstance(alphas, (int, float)) else alphas[path])
        if alpha in (0.0, 1.0):
            source = trained if alpha == 1.0 else start
            values[a_name], values[b_name] = source[a_name].clone(), source[b_name].clone()
        elif space == "factors":
            values[a_name] = interpolate(start[a_name], trained[a_name], alpha)
            values[b_name] = interpolate(start[b_name], trained[b_name], alpha)
        else:
            a, b, error = interpolate_lowrank_product(start[a_name], start[b_name], trained[a_name], trained[b_name],
                                                      alpha)
            values[a_name], values[b_name] = a.to(torch.float32), b.to(torch.float32)
            errors.append(error)
    return values, (sum(errors) / len(errors) if errors else 0.0)


def _product_sq_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """``||b @ a||_F**2`` from the two small Gram matrices (never the d_out x d_in product), in float64."""
    b, a = b.double(), a.double()
    return float(((b.T @ b) * (a @ a.T)).sum())


def update_norm(reference: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor],
                pairs: Mapping[str, tuple[str, str]], scalings: Mapping[str, float]) -> float:
    """``sqrt(Σ_modules ||s·(B·A − B₀·A₀)||²)``: the norm of the weight change from ``reference`` to ``values``."""
    total = 0.0
    for path, (a_name, b_name) in pairs.items():
        b = torch.cat([values[b_name], -reference[b_name]], dim=1)
        a = torch.cat([values[a_name], reference[a_name]], dim=0)
        total += scalings[path] ** 2 * _product_sq_norm(b, a)
    return max(total, 0.0) ** 0.5


class ModelAveragingCallback(TaskBoundaryCallback):
    """Model averaging at each task boundary ("Mitigating the Alignment Tax of RLHF", arXiv 2309.06256).

    After the task's last optimizer step the ``adapter`` (default ``default``) becomes ``start + α·(trained − start)``
    per LoRA module, α from ``config.alpha`` / ``config.per_layer``; ``config.space`` says whether ΔW = s·B·A
    (``"product"``, exact then re-factorised to rank r) or each factor (``"factors"``) is interpolated. α = 1 leaves
    the adapter bit for bit as trained.

    Logs ``averaging/alpha_mean``, ``averaging/update_norm_before`` / ``_after`` (the norm of the task's weight
    change ΔW, LoRA scaling included, before and after averaging) and ``averaging/refactor_error`` (mean relative
    truncation error of the product re-factorisation; 0 in factor space). ``begin_task(model)`` / ``average(model)``
    mark boundaries by hand.
    """

    name = "averaging"

    def __init__(self, config: AveragingConfig | None = None, state_dir=None, adapter: str = DEFAULT_ADAPTER):
        super().__init__(state_dir)
        self.config = config if config is not None else AveragingConfig()
        self.adapter = adapter
        self._start: dict[str, torch.Tensor] | None = None

    def start_task(self, task_index: int, train_rows: list[dict] | None = None) -> None:
        super().start_task(task_index, train_rows)
        self._start = None  # a snapshot left by a task that failed midway is stale

    def begin_task(self, model) -> None:
        """Snapshot the adapter's factors as the task's start (every rank must call it); ``on_train_begin`` does it
        unless a task was begun by hand (e.g. before an SFT warm-up)."""
        check_lora_adapter(model, self.adapter, "ModelAveragingCallback")
        self._start = read_factors(model, self.adapter)

    def average(self, model) -> dict:
        """Replace the trained adapter by the interpolation (every rank must call it); returns the summary."""
        if self._start is None:
            raise RuntimeError("ModelAveragingCallback.average() called without begin_task(): no snapshot of the start")
        start, self._start = self._start, None
        trained = read_factors(model, self.adapter)
        if set(trained) != set(start):
            raise RuntimeError("the adapter's LoRA factors changed between the task's start and its end")
        pairs = lora_pairs(trained)
        alphas = layer_alphas(pairs, self.config.alpha, self.config.per_layer)
        values, error = interpolate_adapter(start, trained, alphas, self.config.space, pairs)
        write_factors(model, values, self.adapter)
        scalings = lora_scalings(model, pairs, self.adapter)
        self.last_summary = {
            "task": self.task_index, "space": self.config.space,
            "alpha_mean": sum(alphas.values()) / len(alphas),
            "update_norm_before": update_norm(start, trained, pairs, scalings),
            "update_norm_after": update_norm(start, values, pairs, scalings),
            "refactor_error": error,
        }
        return self.summary()

    def _finish(self, model, state) -> None:
        if model is None:
            raise RuntimeError("ModelAveragingCallback received no model from the trainer")
        summary = self.average(model)
        self.log_metrics({f"averaging/{key}": float(summary[key]) for key in
                          ("alpha_mean", "update_norm_before", "update_norm_after", "refactor_error")}, state)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._start is None:
            if model is None:
                raise RuntimeError("ModelAveragingCallback received no model from the trainer")
            self.begin_task(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._start is not None and is_last_step(state):
            self._finish(model, state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # Training that stopped before its last step (early stopping) still ends the task.
        if self._start is not None:
            self._finish(model, state)
