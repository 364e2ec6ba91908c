"""Online elastic weight consolidation (Schwarz et al. 2018, "Progress & Compress"; Kirkpatrick et al. 2017).

EWC keeps the weights that mattered for earlier tasks near their values after those tasks with a quadratic penalty
``(strength / 2) * sum_i F_i * (theta_i - theta*_i)**2``, weighted by a diagonal Fisher information ``F`` estimated
from squared gradients. The online variant keeps a single Fisher and a single anchor whatever the number of tasks:
at each boundary ``F <- decay * F + F_task`` and the anchor moves to the weights just trained, so memory and cost stay
constant instead of growing with one penalty per task.

Everything is keyed by parameter name (plain dicts of tensors). The penalty keeps its autograd graph; the explicit
gradient (:func:`ewc_penalty_grad`, :func:`add_ewc_grad_`) lets a trainer add it to ``.grad`` without a second
backward. All math runs in float32 (float64 if an input is float64).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = [
    "FisherAccumulator",
    "add_ewc_grad_",
    "ewc_penalty",
    "ewc_penalty_grad",
    "online_fisher",
    "squared_gradients",
]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_strength(strength: float) -> float:
    if not strength >= 0.0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    return float(strength)


def squared_gradients(grads: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """``{name: grad**2}`` in float32 (float64), detached; ``None`` gradients (unused parameters) are skipped."""
    return {name: grad.detach().to(_compute_dtype(grad)).square() for name, grad in grads.items() if grad is not None}


class FisherAccumulator:
    """Running mean of squared gradients over batches: the empirical diagonal Fisher of one task.

    Call :meth:`update` once per batch with that batch's gradients (e.g. ``{n: p.grad for n, p in named_params}``). A
    parameter missing from a batch (or with a ``None`` gradient) counts as a zero gradient for that batch, so every
    entry is a mean over all :attr:`count` batches.
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean: dict[str, torch.Tensor] = {}

    def update(self, grads: Mapping[str, torch.Tensor | None]) -> None:
        """Fold one batch's gradients into the running mean (``mean += (g**2 - mean) / count``)."""
        squares = squared_gradients(grads)
        for name, square in squares.items():
            known = self._mean.get(name)
            if known is not None and known.shape != square.shape:
                raise ValueError(f"gradient of {name!r} has shape {tuple(square.shape)}, earlier {tuple(known.shape)}")
        self.count += 1
        for name, mean in self._mean.items():
            square = squares.pop(name, None)
            if square is None:
                mean.mul_((self.count - 1) / self.count)
            else:
                mean.add_(square.to(mean.dtype).sub_(mean), alpha=1.0 / self.count)
        for name, square in squares.items():  # first seen now: the earlier batches contributed zeros
            self._mean[name] = square.div_(self.count)

    def fisher(self) -> dict[str, torch.Tensor]:
        """A copy of the current mean (empty before the first :meth:`update`)."""
        return {name: mean.clone() for name, mean in self._mean.items()}

    def reset(self) -> None:
        """Forget every batch (start of the next task)."""
        self.count = 0
        self._mean = {}


def online_fisher(
    previous: Mapping[str, torch.Tensor] | None, current: Mapping[str, torch.Tensor], decay: float
) -> dict[str, torch.Tensor]:
    """``decay * previous + current`` per name (Progress & Compress's online Fisher); a copy of ``current`` when
    ``previous`` is None. Both must have the same names and shapes.

    Args:
        previous: the consolidated Fisher of the earlier tasks, or None after the first task.
        current: the Fisher of the task just trained.
        decay: gamma in [0, 1]; 1 weighs every task equally, 0 keeps only the last.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    if previous is None:
        return {name: value.detach().to(_compute_dtype(value), copy=True) for name, value in current.items()}
    if set(previous) != set(current):
        missing, extra = sorted(set(previous) - set(current)), sorted(set(current) - set(previous))
        raise ValueError(f"previous and current Fisher differ in names: only previous {missing}, only current {extra}")
    result = {}
    for name, value in current.items():
        before = previous[name]
        if before.shape != value.shape:
            raise ValueError(f"Fisher of {name!r}: previous {tuple(before.shape)}, current {tuple(value.shape)}")
        dtype = _compute_dtype(before, value)
        result[name] = torch.add(value.detach().to(dtype), before.detach().to(dtype), alpha=decay)
    return result


def _terms(params, anchors, fisher):
    """Yield ``(name, param, anchor, fisher)`` with anchor and Fisher detached, in the param's compute dtype."""
    for name, param in params.items():
        for what, mapping in (("anchors", anchors), ("fisher", fisher)):
            if name not in mapping:
                raise ValueError(f"{what} has no entry for parameter {name!r}")
            if mapping[name].shape != param.shape:
                raise ValueError(f"{what}[{name!r}] has shape {tuple(mapping[name].shape)}, "
                                 f"the parameter {tuple(param.shape)}")
        dtype = _compute_dtype(param, anchors[name], fisher[name])
        yield name, param, anchors[name].detach().to(dtype), fisher[name].detach().to(dtype), dtype


def ewc_penalty(
    params: Mapping[str, torch.Tensor],
    anchors: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor],
    strength: float,
) -> torch.Tensor:
    """``(strength / 2) * sum over params of F * (theta - theta*)**2``, a 0-d tensor with autograd through ``params``.

    Every name in ``params`` needs an anchor and a Fisher (extra names there are ignored). Empty ``params`` give 0.
    """
    strength = _check_strength(strength)
    terms = [(weight * (param.to(dtype) - anchor).square()).sum() for _, param, anchor, weight, dtype in
             _terms(params, anchors, fisher)]
    if not terms:
        return torch.zeros((), dtype=torch.float32)
    dtype = torch.float64 if any(term.dtype == torch.float64 for term in terms) else torch.float32
    return torch.stack([term.to(dtype) for term in terms]).sum() * (0.5 * strength)


def ewc_penalty_grad(
    params: Mapping[str, torch.Tensor],
    anchors: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor],
    strength: float,
) -> dict[str, torch.Tensor]:
    """``{name: strength * F * (theta - theta*)}``, the gradient of :func:`ewc_penalty` (no autograd graph)."""
    strength = _check_strength(strength)
    return {
        name: weight.mul(param.detach().to(dtype) - anchor).mul_(strength)
        for name, param, anchor, weight, dtype in _terms(params, anchors, fisher)
    }


def add_ewc_grad_(
    params_with_grad: Mapping[str, torch.Tensor],
    anchors: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor],
    strength: float,
) -> float:
    """Add the EWC penalty's gradient to each parameter's ``.grad`` in place (creating it when None) and return the
    penalty's value: the same update as adding :func:`ewc_penalty` to the loss, without its autograd graph.

    The gradient is computed in float32 (float64) and cast to the ``.grad`` dtype when added.
    """
    strength = _check_strength(strength)
    value = 0.0
    with torch.no_grad():
        for _, param, anchor, weight, dtype in _terms(params_with_grad, anchors, fisher):
            diff = param.detach().to(dtype) - anchor
            grad = weight * diff
            value += 0.5 * strength * float((grad * diff).sum(dtype=torch.float64))
            grad.mul_(strength)
            if param.grad is None:
                param.grad = grad.to(param.dtype)
            else:
                param.grad.add_(grad.to(param.grad.dtype))
    return value
