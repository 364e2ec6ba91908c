"""Pure tensor math of the continual-learning defences (and SLMC's subspace memory) against plain float64 references.

Every function is checked against an independent float64 computation (numpy or explicit loops), penalties' gradients
against autograd, across input dtypes and the edge cases (zero update, empty basis, full basis, no earlier task).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _slmc_utils import reference_denoise, rel_err

from trl_lifealign.defences.averaging.math import interpolate, interpolate_lowrank_product, layer_alphas
from trl_lifealign.defences.budget.math import largest_step_within_budget
from trl_lifealign.defences.ewc.math import (
    FisherAccumulator,
    add_ewc_grad_,
    ewc_penalty,
    ewc_penalty_grad,
    online_fisher,
    squared_gradients,
)
from trl_lifealign.defences.freezing.math import frozen_parameter_names, is_lora_parameter, layer_index
from trl_lifealign.defences.lwf.math import token_kl
from trl_lifealign.defences.olora.math import orthogonality_penalty, orthogonality_penalty_grad
from trl_lifealign.slmc.subspace import (
    consolidate_update_subspace,
    extend_subspace,
    factor_side,
    leading_directions,
    project_against_subspace,
    project_step_,
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# Tolerance of a float32/float64 result against the float64 reference of the same (dtype-rounded) inputs.
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-5}


def _out_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _randn(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _low_rank(shape, rank, seed, noise=0.05):
    rows, cols = shape
    signal = _randn((rows, rank), seed) @ _randn((rank, cols), seed + 1)
    return signal + noise * _randn(shape, seed + 2)


def _orthonormal(n, k, seed):
    return torch.linalg.qr(_randn((n, k), seed))[0]


def _projector(vectors):
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors @ vectors.T


def _span_projector(matrix, side, tol=1e-6):
    """Float64 orthogonal projector onto the row (side "row") or column space of ``matrix``."""
    u, s, vt = np.linalg.svd(np.asarray(matrix, dtype=np.float64), full_matrices=False)
    keep = s > tol * s.max() if s.size and s.max() > 0 else np.zeros(s.shape, bool)
    return _projector(vt[keep].T if side == "row" else u[:, keep])


def _assert_orthonormal(basis, tol):
    gram = (basis.double().T @ basis.double()).numpy()
    assert np.abs(gram - np.eye(basis.shape[1])).max() < tol


# ---------------------------------------------------------------------------------------------------------------------
# SLMC subspace memory (trl_lifealign.slmc.subspace)
# ---------------------------------------------------------------------------------------------------------------------

FACTOR_SHAPES = [((4, 48), "row"), ((40, 4), "column")]  # lora_A (r x d_in), lora_B (d_out x r)


def test_factor_side():
    assert factor_side("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == "row"
    assert factor_side("base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight") == "column"
    assert factor_side("base_model.model.model.embed_tokens.lora_embedding_A.default") == "row"
    assert factor_side("base_model.model.model.embed_tokens.lora_embedding_B.default") == "column"
    assert factor_side("lora_A") == "row" and factor_side("lora_B") == "column"
    assert factor_side("row") == "row" and factor_side("column") == "column"
    for bad in ["model.layers.0.q_proj.weight", "q_proj.lora_magnitude_vector.default.weight", "my_lora_A_thing"]:
        with pytest.raises(ValueError, match="name_or_kind"):
            factor_side(bad)


def _reference_leading(update, side, theta):
    u, s, vt = np.linalg.svd(np.asarray(update, dtype=np.float64), full_matrices=False)
    rank = int((s > s.max() * max(update.shape) * 1e-12).sum()) if s.size and s.max() > 0 else 0
    if rank == 0:
        return np.zeros((update.shape[1] if side == "row" else update.shape[0], 0))
    k = rank if theta >= 1 else min(int(np.argmax(np.cumsum(s**2) / (s**2).sum() >= theta)) + 1, rank)
    return vt[:k].T if side == "row" else u[:, :k]


@pytest.mark.parametrize("shape,side", FACTOR_SHAPES + [((4, 48), "column"), ((40, 4), "row")])
@pytest.mark.parametrize("theta", [0.0, 0.5, 0.9, 0.99, 1.0, 1.5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_leading_directions_match_svd(shape, side, theta, dtype):
    update = _low_rank(shape, 2, seed=10).to(dtype)
    directions = leading_directions(update, side, theta)
    expected = _reference_leading(update.double().numpy(), side, theta)
    assert directions.dtype == _out_dtype(dtype) and directions.shape == expected.shape
    _assert_orthonormal(directions, 10 * TOL[dtype])
    # Singular vectors are defined up to sign (and rotation within ties): compare the projectors.
    assert np.abs(_projector(directions) - _projector(expected)).max() < 100 * TOL[dtype]


def test_leading_directions_edge_cases():
    assert leading_directions(torch.zeros(4, 48), "row", 0.9).shape == (48, 0)
    assert leading_directions(torch.zeros(40, 4), "column", 1.0).shape == (40, 0)
    # A rank-2 update: theta >= 1 keeps its 2 nonzero directions, not the min(shape) = 4 singular vectors.
    rank_two = _low_rank((4, 48), 2, seed=11, noise=0.0)
    assert leading_directions(rank_two, "row", 1.0).shape == (48, 2)
    assert leading_directions(rank_two.float(), "row", 2.0).shape == (48, 2)
    with pytest.raises(ValueError, match="side"):
        leading_directions(rank_two, "rows", 0.9)
    with pytest.raises(ValueError, match="energy_threshold"):
        leading_directions(rank_two, "row", -0.1)
    with pytest.raises(ValueError, match="update"):
        leading_directions(torch.zeros(48), "row", 0.9)


def _reference_project(update, basis, side, lam):
    u, q = np.asarray(update, dtype=np.float64), np.asarray(basis, dtype=np.float64)
    in_span = u @ q @ q.T if side == "row" else q @ q.T @ u
    norm = np.linalg.norm(u)
    return u - (1.0 - lam) * in_span, (np.linalg.norm(in_span) / norm if norm > 0 else 0.0)


@pytest.mark.parametrize("shape,side", FACTOR_SHAPES)
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_project_against_subspace_matches_reference(shape, side, lam, dtype):
    update = _randn(shape, 20).to(dtype)
    n = shape[1] if side == "row" else shape[0]
    basis = _orthonormal(n, 6, seed=21).to(_out_dtype(dtype))
    result, share = project_against_subspace(update, basis, side, lam)
    expected, expected_share = _reference_project(update.double().numpy(), basis.double().numpy(), side, lam)
    assert result.dtype == _out_dtype(dtype) and result.shape == update.shape
    assert rel_err(result.numpy(), expected) < TOL[dtype]
    assert share == pytest.approx(expected_share, rel=TOL[dtype])
    assert 0.0 < share < 1.0
    if lam == 0.0:  # what is left acts on no stored direction
        leak = result.double() @ basis.double() if side == "row" else basis.double().T @ result.double()
        assert float(leak.norm()) < 10 * TOL[dtype] * float(update.double().norm())


def test_project_against_subspace_edge_cases():
    update = _randn((4, 48), 22, torch.float32)
    # Empty basis (None or n x 0): a copy of the update, never the same tensor.
    for empty in (None, torch.zeros(48, 0)):
        result, share = project_against_subspace(update, empty, "row", 0.0)
        assert torch.equal(result, update) and result is not update and share == 0.0
    # Zero update: zero result, share 0 (no 0/0).
    result, share = project_against_subspace(torch.zeros(4, 48), _orthonormal(48, 3, 23), "row", 0.0)
    assert torch.count_nonzero(result) == 0 and share == 0.0
    # Full basis: everything is in the span; lambda = 0 removes all of it, lambda = 0.25 keeps a quarter.
    full = _orthonormal(48, 48, 24)
    result, share = project_against_subspace(update.double(), full, "row", 0.0)
    assert float(result.norm()) < 1e-12 * float(update.norm()) and share == pytest.approx(1.0, rel=1e-12)
    result, _ = project_against_subspace(update.double(), full, "row", 0.25)
    assert rel_err(result.numpy(), 0.25 * update.double().numpy()) < 1e-12
    with pytest.raises(ValueError, match="basis"):
        project_against_subspace(update, torch.zeros(4, 2), "row", 0.5)  # a column-side basis for a row update
    with pytest.raises(ValueError, match="overlap_weight"):
        project_against_subspace(update, None, "row", 1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extend_subspace_spans_basis_and_new_directions(dtype):
    basis = _orthonormal(30, 4, seed=30).to(dtype)
    directions = _randn((30, 5), 31).to(dtype)
    rel_tol = 1e-4 if dtype == torch.float32 else 1e-6
    extended = extend_subspace(basis, directions, rel_tol=rel_tol)
    assert extended.shape == (30, 9) and extended.dtype == dtype
    _assert_orthonormal(extended, 10 * TOL[dtype])
    assert torch.equal(extended[:, :4], basis)  # the existing basis is kept as is, new columns appended
    expected = _span_projector(np.hstack([basis.double().numpy(), directions.double().numpy()]), "column")
    assert np.abs(_projector(extended) - expected).max() < 100 * TOL[dtype]


def test_extend_subspace_drops_dependent_zero_and_excess_directions():
    basis = _orthonormal(10, 3, seed=32)
    inside = basis @ _randn((3, 2), 33)  # two directions inside the span
    new = _randn((10, 1), 34)
    directions = torch.cat([inside, torch.zeros(10, 1), new, 2.0 * new + inside[:, :1]], dim=1)
    extended = extend_subspace(basis, directions)
    assert extended.shape == (10, 4)  # only `new` adds a direction
    _assert_orthonormal(extended, 1e-12)
    # Never more than n columns, nor max_rank; a 1-D direction is one column; None is the empty basis.
    assert extend_subspace(basis, _randn((10, 20), 35)).shape == (10, 10)
    assert extend_subspace(basis, _randn((10, 20), 35), max_rank=5).shape == (10, 5)
    assert extend_subspace(basis, _randn((10, 20), 35), max_rank=2).shape == (10, 3)  # not truncated
    assert extend_subspace(None, _randn((10,), 36)).shape == (10, 1)
    assert extend_subspace(None, torch.zeros(10, 0)).shape == (10, 0)
    result = extend_subspace(basis, torch.zeros(10, 2))
    assert torch.equal(result, basis) and result is not basis
    # Nearly dependent directions (Gram-Schmidt twice keeps the result orthonormal to working precision).
    close = basis[:, :1] + 1e-5 * _randn((10, 1), 37)
    extended = extend_subspace(basis, close)
    assert extended.shape == (10, 4)
    _assert_orthonormal(extended, 1e-10)
    with pytest.raises(ValueError, match="rel_tol"):
        extend_subspace(basis, new, rel_tol=-1.0)
    with pytest.raises(ValueError, match="max_rank"):
        extend_subspace(basis, new, max_rank=-1)
    with pytest.raises(ValueError, match="basis"):
        extend_subspace(torch.zeros(9, 2), new)


@pytest.mark.parametrize("shape,side", FACTOR_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_project_step_in_place(shape, side, dtype):
    delta = _randn(shape, 40).to(dtype)
    original = delta.clone()
    n = shape[1] if side == "row" else shape[0]
    basis = _orthonormal(n, 3, seed=41).float()
    pointer = delta.data_ptr()
    returned = project_step_(delta, basis, side)
    assert returned is delta and delta.data_ptr() == pointer and delta.dtype == dtype
    expected, _ = _reference_project(original.double().numpy(), basis.double().numpy(), side, 0.0)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6  # written back in delta's dtype
    assert rel_err(delta.double().numpy(), expected) < tol
    # An empty basis leaves the step untouched.
    untouched = original.clone()
    project_step_(untouched, None, side)
    assert torch.equal(untouched, original)
    with pytest.raises(ValueError, match="basis"):
        project_step_(untouched, torch.zeros(n + 1, 2), side)


def test_project_step_keeps_adam_out_of_the_subspace():
    """Projecting Adam's parameter change keeps the protected directions untouched; projecting the gradient does not
    (Adam's per-coordinate scaling rotates it back into the subspace)."""
    basis = _orthonormal(48, 6, seed=42)
    target = _randn((4, 48), 43)

    def train(project_change):
        weight = torch.nn.Parameter(_randn((4, 48), 44))
        start = weight.detach().clone()
        optimizer = torch.optim.Adam([weight], lr=0.05)
        for _ in range(10):
            optimizer.zero_grad()
            ((weight - target) ** 2).sum().backward()
            before = weight.detach().clone()
            if not project_change:
                project_step_(weight.grad, basis, "row")
            optimizer.step()
            if project_change:
                with torch.no_grad():
                    weight.copy_(before + project_step_(weight.detach() - before, basis, "row"))
        moved = weight.detach() - start
        return float((moved @ basis).norm()) / float(moved.norm())

    assert train(project_change=True) < 1e-12
    assert train(project_change=False) > 1e-2


def _reference_subspace_sequence(updates, side, theta, lam):
    """Float64 reference: denoise, then project against the row/column space of all earlier consolidated updates."""
    history, betas = [], []
    for update in updates:
        a = reference_denoise(np.asarray(update, dtype=np.float64), theta)
        if history:
            p = _span_projector(np.concatenate(history, axis=0 if side == "row" else 1), side)
            a = a - (1.0 - lam) * (a @ p if side == "row" else p @ a)
        history.append(a)
        betas.append(a)
    return betas, history


@pytest.mark.parametrize("shape,side", FACTOR_SHAPES)
@pytest.mark.parametrize("theta,lam", [(0.9, 0.5), (0.5, 0.0), (0.99, 0.1), (1.0, 0.3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_consolidate_subspace_sequence_matches_reference(shape, side, theta, lam, dtype):
    shared = _low_rank(shape, 1, seed=50)
    updates = [(0.7 * shared + _low_rank(shape, 2, seed=51 + 3 * task)).to(dtype) for task in range(5)]
    expected, history = _reference_subspace_sequence([u.double().numpy() for u in updates], side, theta, lam)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    basis = None
    for task, (update, beta_ref) in enumerate(zip(updates, expected)):
        result = consolidate_update_subspace(update, basis, side, theta, lam)
        assert result.update.dtype == dtype and result.basis.dtype == dtype
        assert rel_err(result.update.numpy(), beta_ref) < tol, f"task {task}"
        previous = 0 if basis is None else basis.shape[1]
        basis = result.basis
        assert result.added_rank == basis.shape[1] - previous
        # The basis spans exactly the row/column spaces of every consolidated update so far.
        p = _span_projector(np.concatenate(history[: task + 1], axis=0 if side == "row" else 1), side)
        assert basis.shape[1] == round(np.trace(p))
        assert np.abs(_projector(basis) - p).max() < tol
        _assert_orthonormal(basis, tol)
        assert result.kept_rank == np.linalg.matrix_rank(reference_denoise(update.double().numpy(), theta), 1e-9)
        if task > 0:
            assert 0.0 < result.in_span_share < 1.0


def test_consolidate_subspace_edge_cases():
    update = _low_rank((4, 48), 2, seed=60, noise=0.0).float()
    first = consolidate_update_subspace(update, None, "row", 1.0, 0.5)
    assert first.in_span_share == 0.0 and first.added_rank == 2 and torch.allclose(first.update, update)
    # Zero update: stays zero, adds nothing.
    zero = consolidate_update_subspace(torch.zeros(4, 48), first.basis, "row", 0.9, 0.0)
    assert torch.count_nonzero(zero.update) == 0 and zero.added_rank == 0 and zero.in_span_share == 0.0
    # An update inside the stored subspace with lambda = 0: only rounding noise is left, which adds no direction.
    inside = consolidate_update_subspace(3.0 * update, first.basis, "row", 1.0, 0.0)
    assert inside.added_rank == 0 and float(inside.update.norm()) < 1e-5 * float(update.norm())
    assert inside.in_span_share == pytest.approx(1.0, abs=1e-5)
    # ... with lambda = 0.5 it is halved, still no new direction.
    half = consolidate_update_subspace(3.0 * update, first.basis, "row", 1.0, 0.5)
    assert half.added_rank == 0 and rel_err(half.update.numpy(), 1.5 * update.numpy()) < 1e-5
    # The basis fills up (d_in = 8, rank-4 updates): then lambda = 0 leaves nothing, and nothing is added.
    basis = None
    for task in range(3):
        result = consolidate_update_subspace(_randn((4, 8), 61 + task), basis, "row", 1.0, 0.0)
        basis = result.basis
    assert basis.shape == (8, 8) and result.added_rank == 0 and float(result.update.norm()) < 1e-10
    # bf16 input: computed in float32.
    bf16 = consolidate_update_subspace(update.bfloat16(), first.basis, "row", 0.9, 0.5)
    assert bf16.update.dtype == torch.float32 and bf16.basis.dtype == torch.float32
    bad = update.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        consolidate_update_subspace(bad, None, "row")
    with pytest.raises(ValueError, match="overlap_weight"):
        consolidate_update_subspace(update, None, "row", 0.9, -0.5)
    with pytest.raises(ValueError, match="side"):
        consolidate_update_subspace(update, None, "lora_A")


# ---------------------------------------------------------------------------------------------------------------------
# Model averaging (trl_lifealign.defences.averaging.math)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_interpolate_matches_reference(dtype, alpha):
    start, trained = _randn((6, 10), 70).to(dtype), _randn((6, 10), 71).to(dtype)
    result = interpolate(start, trained, alpha)
    s, t = start.double().numpy(), trained.double().numpy()
    assert result.dtype == _out_dtype(dtype)
    assert rel_err(result.numpy(), s + alpha * (t - s)) < TOL[dtype]
    if alpha in (0.0, 1.0):  # exact at both ends
        assert torch.equal(result, (start if alpha == 0.0 else trained).to(_out_dtype(dtype)))


def test_interpolate_per_element_alpha_and_errors():
    start, trained = _randn((6, 10), 72), _randn((6, 10), 73)
    alpha = torch.linspace(0, 1, 6, dtype=torch.float64).unsqueeze(1)  # one ratio per output row
    result = interpolate(start, trained, alpha)
    assert rel_err(result.numpy(), (start + alpha * (trained - start)).numpy()) < 1e-14
    with pytest.raises(ValueError, match="alpha"):
        interpolate(start, trained, 1.5)
    with pytest.raises(ValueError, match="alpha"):
        interpolate(start, trained, torch.full((6, 1), -0.1))
    with pytest.raises(ValueError, match="alpha"):
        interpolate(start, trained, torch.ones(3, 6, 10))
    with pytest.raises(ValueError, match="trained"):
        interpolate(start, trained.T, 0.5)


def test_layer_alphas():
    names = [
        "base_model.model.model.embed_tokens.lora_embedding_A.default",
        *[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.default.weight" for i in range(8)],
        "base_model.model.lm_head.weight",
    ]
    per_layer = {"1-2": 0.3, "5-": 0.7, range(3, 4): 0.2, 6: 0.1}
    alphas = layer_alphas(names, 0.5, per_layer)
    by_layer = [alphas[name] for name in names[1:9]]
    assert by_layer == [0.5, 0.3, 0.3, 0.2, 0.5, 0.7, 0.1, 0.7]  # 6: a single index overrides the range "5-"
    assert alphas[names[0]] == 0.5 and alphas[names[-1]] == 0.5  # no layer index: the global ratio
    assert layer_alphas(names[:2], 0.4) == {names[0]: 0.4, names[1]: 0.4}
    with pytest.raises(ValueError, match="overlap"):
        layer_alphas(names, 0.5, {"0-3": 0.1, "2-5": 0.2})
    layer_alphas(names, 0.5, {"0-3": 0.1, "2-5": 0.1})  # overlapping with the same ratio is fine
    for bad in ["a-b", "3-1", "-2", -1, range(4, 2)]:
        with pytest.raises(ValueError, match="per_layer key"):
            layer_alphas(names, 0.5, {bad: 0.1})
    with pytest.raises(ValueError, match=r"per_layer\[2\]"):
        layer_alphas(names, 0.5, {2: 1.1})
    with pytest.raises(ValueError, match="alpha"):
        layer_alphas(names, -0.5)


def _lora_pair(r, d_in, d_out, seed):
    return _randn((r, d_in), seed), _randn((d_out, r), seed + 1)


def _dense_reference(a0, b0, a1, b1, alpha, rank):
    exact = (1 - alpha) * b0.double().numpy() @ a0.double().numpy() + alpha * b1.double().numpy() @ a1.double().numpy()
    u, s, vt = np.linalg.svd(exact, full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vt[:rank]
    error = np.sqrt((s[rank:] ** 2).sum() / (s**2).sum()) if (s**2).sum() > 0 else 0.0
    return exact, best, error


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("rank", [None, 2, 8])
def test_interpolate_lowrank_product_matches_dense(alpha, rank):
    a0, b0 = _lora_pair(4, 24, 30, seed=80)
    a1, b1 = _lora_pair(4, 24, 30, seed=82)
    a, b, error = interpolate_lowrank_product(a0, b0, a1, b1, alpha, rank)
    r = 4 if rank is None else rank
    exact, best, expected_error = _dense_reference(a0, b0, a1, b1, alpha, r)
    assert a.shape == (r, 24) and b.shape == (30, r) and a.dtype == torch.float64
    assert rel_err((b @ a).numpy(), best) < 1e-10
    assert error == pytest.approx(expected_error, abs=1e-12)
    # Balanced factors: a a^T = b^T b = diag(S).
    assert np.abs((a @ a.T - b.T @ b).numpy()).max() < 1e-10
    if alpha == 1.0 and r >= 4:  # the trained product (rank 4), up to rounding
        assert rel_err((b @ a).numpy(), (b1 @ a1).numpy()) < 1e-12 and error < 1e-12
    if r == 8:  # rank 2r: exact
        assert rel_err((b @ a).numpy(), exact) < 1e-12 and error < 1e-12


def test_interpolate_lowrank_product_edge_cases():
    a1, b1 = _lora_pair(4, 24, 30, seed=84)
    # A fresh adapter (zero start): exact at rank r.
    a, b, error = interpolate_lowrank_product(torch.zeros(4, 24), torch.zeros(30, 4), a1, b1, 0.6)
    assert rel_err((b @ a).numpy(), (0.6 * b1 @ a1).numpy()) < 1e-12 and error < 1e-12
    # Everything zero: zero factors, no 0/0.
    a, b, error = interpolate_lowrank_product(torch.zeros(4, 24), torch.zeros(30, 4), 0 * a1, 0 * b1, 0.5)
    assert torch.count_nonzero(b @ a) == 0 and error == 0.0
    # Different start rank, and a d_out smaller than 2r (the core is then smaller than the rank asked: zero padding).
    a0, b0 = _lora_pair(2, 24, 3, seed=85)
    a1s, b1s = _lora_pair(4, 24, 3, seed=86)
    a, b, error = interpolate_lowrank_product(a0, b0, a1s, b1s, 0.5)
    exact, _, _ = _dense_reference(a0, b0, a1s, b1s, 0.5, 4)
    assert a.shape == (4, 24) and b.shape == (3, 4) and rel_err((b @ a).numpy(), exact) < 1e-12
    # float32 and bf16 inputs compute in float32.
    for dtype in (torch.float32, torch.bfloat16):
        a0, b0 = _lora_pair(4, 24, 30, seed=87)
        inputs = [t.to(dtype) for t in (a0, b0, a1, b1)]
        a, b, _ = interpolate_lowrank_product(*inputs, 0.4)
        _, best, _ = _dense_reference(*inputs, 0.4, 4)
        assert a.dtype == torch.float32 and rel_err((b @ a).double().numpy(), best) < 1e-5
    with pytest.raises(ValueError, match="a0"):
        interpolate_lowrank_product(torch.zeros(4, 24), torch.zeros(30, 3), a1, b1, 0.5)
    with pytest.raises(ValueError, match="differ in shape"):
        interpolate_lowrank_product(torch.zeros(4, 20), torch.zeros(30, 4), a1, b1, 0.5)
    with pytest.raises(ValueError, match="rank"):
        interpolate_lowrank_product(a1, b1, a1, b1, 0.5, rank=0)
    with pytest.raises(ValueError, match="alpha"):
        interpolate_lowrank_product(a1, b1, a1, b1, 2.0)


# ---------------------------------------------------------------------------------------------------------------------
# Online EWC (trl_lifealign.defences.ewc.math)
# ---------------------------------------------------------------------------------------------------------------------

EWC_SHAPES = {"layers.0.lora_A": (4, 12), "layers.0.lora_B": (10, 4), "layers.1.lora_A": (4, 12)}


def _ewc_dicts(dtype=torch.float64, seed=90):
    items = list(enumerate(EWC_SHAPES.items()))
    params = {name: _randn(shape, seed + i).to(dtype) for i, (name, shape) in items}
    anchors = {name: _randn(shape, seed + 10 + i).to(dtype) for i, (name, shape) in items}
    fisher = {name: _randn(shape, seed + 20 + i).square().to(dtype) for i, (name, shape) in items}
    return params, anchors, fisher


def _ewc_reference(params, anchors, fisher, strength):
    return 0.5 * strength * sum(
        float((fisher[n].double() * (params[n].double() - anchors[n].double()) ** 2).sum()) for n in params
    )


def test_squared_gradients_and_fisher_accumulator():
    batches = [{name: _randn(shape, 100 + 3 * b + i) for i, (name, shape) in enumerate(EWC_SHAPES.items())}
               for b in range(4)]
    batches[1]["layers.1.lora_A"] = None  # unused in one batch: a zero gradient there
    del batches[2]["layers.0.lora_B"]  # missing from another
    squares = squared_gradients({"x": torch.tensor([2.0, -3.0], dtype=torch.bfloat16), "y": None})
    assert list(squares) == ["x"] and squares["x"].dtype == torch.float32 and squares["x"].tolist() == [4.0, 9.0]
    accumulator = FisherAccumulator()
    assert accumulator.count == 0 and accumulator.fisher() == {}
    for batch in batches:
        accumulator.update(batch)
    assert accumulator.count == 4
    fisher = accumulator.fisher()
    for name in EWC_SHAPES:
        expected = sum((b[name] ** 2 if b.get(name) is not None else 0.0) for b in batches) / 4
        assert rel_err(fisher[name].numpy(), np.asarray(expected)) < 1e-14
    # A parameter first seen in a later batch: the earlier batches count as zeros.
    late = FisherAccumulator()
    late.update({"a": torch.ones(2)})
    late.update({"a": torch.ones(2), "b": torch.full((2,), 2.0)})
    assert late.fisher()["b"].tolist() == [2.0, 2.0] and late.fisher()["a"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="'a'"):
        late.update({"a": torch.ones(3)})
    assert late.count == 2  # a refused batch changes nothing
    late.reset()
    assert late.count == 0 and late.fisher() == {}


def test_online_fisher():
    _, previous, current = _ewc_dicts()
    first = online_fisher(None, current, 0.9)
    assert all(torch.equal(first[n], current[n]) and first[n] is not current[n] for n in current)
    combined = online_fisher(previous, current, 0.9)
    for name in current:
        assert rel_err(combined[name].numpy(), (0.9 * previous[name] + current[name]).numpy()) < 1e-15
    with pytest.raises(ValueError, match="layers.1.lora_A"):
        online_fisher({n: v for n, v in previous.items() if n != "layers.1.lora_A"}, current, 0.9)
    with pytest.raises(ValueError, match="decay"):
        online_fisher(previous, current, 1.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strength", [0.0, 0.5, 100.0])
def test_ewc_penalty_and_gradient_match_reference(dtype, strength):
    params, anchors, fisher = _ewc_dicts(dtype)
    penalty = ewc_penalty(params, anchors, fisher, strength)
    assert penalty.dtype == _out_dtype(dtype) and penalty.ndim == 0
    assert float(penalty) == pytest.approx(_ewc_reference(params, anchors, fisher, strength), rel=TOL[dtype], abs=0)
    grads = ewc_penalty_grad(params, anchors, fisher, strength)
    for name in params:
        expected = strength * fisher[name].double() * (params[name].double() - anchors[name].double())
        assert grads[name].dtype == _out_dtype(dtype)
        assert rel_err(grads[name].numpy(), expected.numpy()) < TOL[dtype]


def test_ewc_gradient_matches_autograd():
    params, anchors, fisher = _ewc_dicts(torch.float64)
    leaves = {name: value.clone().requires_grad_(True) for name, value in params.items()}
    penalty = ewc_penalty(leaves, anchors, fisher, 3.0)
    autograd = torch.autograd.grad(penalty, list(leaves.values()))
    explicit = ewc_penalty_grad(params, anchors, fisher, 3.0)
    for name, grad in zip(leaves, autograd):
        torch.testing.assert_close(explicit[name], grad, rtol=1e-13, atol=1e-13)
    # add_ewc_grad_: creates .grad when None, adds to an existing one, returns the penalty's value.
    added = {name: value.clone().requires_grad_(True) for name, value in params.items()}
    existing = _randn(EWC_SHAPES["layers.0.lora_B"], 120)
    added["layers.0.lora_B"].grad = existing.clone()
    value = add_ewc_grad_(added, anchors, fisher, 3.0)
    assert value == pytest.approx(float(penalty.detach()), rel=1e-13)
    for name, grad in zip(added, autograd):
        expected = grad + existing if name == "layers.0.lora_B" else grad
        torch.testing.assert_close(added[name].grad, expected, rtol=1e-13, atol=1e-13)


def test_ewc_bf16_params_and_errors():
    params, anchors, fisher = _ewc_dicts(torch.float32)
    bf16 = {name: torch.nn.Parameter(value.bfloat16()) for name, value in params.items()}
    value = add_ewc_grad_(bf16, anchors, fisher, 2.0)
    assert value == pytest.approx(_ewc_reference({n: p.detach() for n, p in bf16.items()}, anchors, fisher, 2.0),
                                  rel=1e-5)
    for name, param in bf16.items():
        expected = 2.0 * fisher[name].double() * (param.detach().double() - anchors[name].double())
        assert param.grad.dtype == torch.bfloat16 and rel_err(param.grad.double().numpy(), expected.numpy()) < 1e-2
    assert float(ewc_penalty({}, anchors, fisher, 1.0)) == 0.0
    for broken, what in (("anchors", anchors), ("fisher", fisher)):
        partial = {n: v for n, v in what.items() if n != "layers.0.lora_B"}
        args = (params, partial, fisher) if broken == "anchors" else (params, anchors, partial)
        for function in (ewc_penalty, ewc_penalty_grad, add_ewc_grad_):
            with pytest.raises(ValueError, match=rf"{broken} has no entry for parameter 'layers.0.lora_B'"):
                function(*args, 1.0)
    with pytest.raises(ValueError, match="strength"):
        ewc_penalty(params, anchors, fisher, -1.0)
    with pytest.raises(ValueError, match="shape"):
        ewc_penalty({"layers.0.lora_A": torch.zeros(4, 11)}, anchors, fisher, 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# KL anchor, LwF style (trl_lifealign.defences.lwf.math)
# ---------------------------------------------------------------------------------------------------------------------


def _kl_reference(policy, reference, mask):
    """Float64 loops: per token sum_v p_ref (log p_ref - log p_pol), then the masked means."""
    policy, reference, mask = policy.double(), reference.double(), mask.bool()
    batch, length, _ = policy.shape
    per_token = torch.zeros(batch, length, dtype=torch.float64)
    for i in range(batch):
        for t in range(length):
            log_p = reference[i, t] - torch.logsumexp(reference[i, t], 0)
            log_q = policy[i, t] - torch.logsumexp(policy[i, t], 0)
            per_token[i, t] = (log_p.exp() * (log_p - log_q)).sum()
    counts = mask.sum(1)
    per_sequence = torch.stack([per_token[i][mask[i]].sum() / max(int(counts[i]), 1) for i in range(batch)])
    mean = per_token[mask].sum() / max(int(counts.sum()), 1)
    return mean, per_sequence


def _kl_inputs(dtype, seed=130):
    policy = (3.0 * _randn((3, 7, 11), seed)).to(dtype)
    reference = (policy.double() + _randn((3, 7, 11), seed + 1)).to(dtype)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]])
    return policy, reference, mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7, 50])
def test_token_kl_matches_reference(dtype, chunk_size):
    policy, reference, mask = _kl_inputs(dtype)
    mean, per_sequence = token_kl(policy, reference, mask, chunk_size)
    expected_mean, expected_per_sequence = _kl_reference(policy, reference, mask)
    assert mean.dtype == _out_dtype(dtype) and per_sequence.shape == (3,)
    assert float(mean) == pytest.approx(float(expected_mean), rel=TOL[dtype])
    assert rel_err(per_sequence.numpy(), expected_per_sequence.numpy()) < TOL[dtype]
    assert float(per_sequence[2]) == 0.0 and bool((per_sequence[:2] > 0).all())


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_token_kl_gradient_flows_to_policy_only(chunk_size):
    policy, reference, mask = _kl_inputs(torch.float64)
    policy.requires_grad_(True)
    reference.requires_grad_(True)
    mean, _ = token_kl(policy, reference, mask.bool(), chunk_size)
    mean.backward()
    assert reference.grad is None
    leaf = policy.detach().clone().requires_grad_(True)
    _kl_reference(leaf, reference.detach(), mask)[0].backward()
    torch.testing.assert_close(policy.grad, leaf.grad, rtol=1e-12, atol=1e-14)
    # Analytic gradient: (softmax(policy) - softmax(reference)) / #tokens on masked tokens, 0 elsewhere.
    analytic = (policy.softmax(-1) - reference.softmax(-1)).detach() * mask.unsqueeze(-1) / mask.sum()
    torch.testing.assert_close(policy.grad, analytic, rtol=1e-12, atol=1e-14)


def test_token_kl_edge_cases():
    policy, reference, mask = _kl_inputs(torch.float32)
    # KL of identical logits is 0, and KL >= 0 always.
    mean, per_sequence = token_kl(policy, policy.clone(), mask)
    assert abs(float(mean)) < 1e-6 and per_sequence.abs().max() < 1e-6
    for seed in range(5):
        p, r, _ = _kl_inputs(torch.float32, seed=200 + 2 * seed)
        assert float(token_kl(p, r, torch.ones(3, 7))[0]) >= 0.0
    # No masked token: 0, no NaN, zero gradient.
    leaf = policy.clone().requires_grad_(True)
    mean, per_sequence = token_kl(leaf, reference, torch.zeros(3, 7, dtype=torch.bool), chunk_size=2)
    mean.backward()
    assert float(mean) == 0.0 and torch.count_nonzero(per_sequence) == 0 and torch.count_nonzero(leaf.grad) == 0
    # A token the reference rules out (logit -inf) contributes nothing instead of NaN.
    ruled_out = reference.clone()
    ruled_out[..., 0] = float("-inf")
    mean, _ = token_kl(policy, ruled_out, mask)
    assert math.isfinite(float(mean)) and float(mean) > 0
    with pytest.raises(ValueError, match="reference_logits"):
        token_kl(policy, reference[:, :, :5], mask)
    with pytest.raises(ValueError, match="mask"):
        token_kl(policy, reference, mask[:, :3])
    with pytest.raises(ValueError, match="chunk_size"):
        token_kl(policy, reference, mask, chunk_size=0)


# ---------------------------------------------------------------------------------------------------------------------
# O-LoRA orthogonality (trl_lifealign.defences.olora.math)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_orthogonality_penalty_matches_reference(dtype):
    a_new = _randn((4, 20), 140).to(dtype)
    earlier = [_randn((r, 20), 141 + r).to(dtype) for r in (4, 2, 8)]  # ranks may differ
    penalty = orthogonality_penalty(a_new, earlier)
    expected = sum(float(np.linalg.norm(a_new.double().numpy() @ e.double().numpy().T) ** 2) for e in earlier)
    assert penalty.dtype == _out_dtype(dtype) and penalty.ndim == 0
    assert float(penalty) == pytest.approx(expected, rel=TOL[dtype])
    grad = orthogonality_penalty_grad(a_new, earlier)
    expected_grad = 2 * sum(a_new.double() @ e.double().T @ e.double() for e in earlier)
    assert grad.dtype == _out_dtype(dtype) and rel_err(grad.numpy(), expected_grad.numpy()) < TOL[dtype]


def test_orthogonality_penalty_gradient_and_edge_cases():
    a_new = _randn((4, 20), 150).requires_grad_(True)
    earlier = [_randn((3, 20), 151).requires_grad_(True), _randn((5, 20), 152)]
    penalty = orthogonality_penalty(a_new, earlier)
    penalty.backward()
    torch.testing.assert_close(a_new.grad, orthogonality_penalty_grad(a_new, earlier), rtol=1e-13, atol=1e-13)
    assert earlier[0].grad is None  # the earlier adapters are frozen
    # No earlier adapter: 0, still in the graph (zero gradient).
    a_new.grad = None
    empty = orthogonality_penalty(a_new, [])
    assert float(empty) == 0.0 and empty.requires_grad
    empty.backward()
    assert torch.count_nonzero(a_new.grad) == 0
    assert torch.count_nonzero(orthogonality_penalty_grad(a_new, [])) == 0
    # Orthogonal row spaces: 0.
    q = _orthonormal(20, 10, 153).T
    assert float(orthogonality_penalty(q[:4], [q[4:7], q[7:]])) < 1e-28
    with pytest.raises(ValueError, match=r"earlier_as\[1\]"):
        orthogonality_penalty(a_new, [earlier[0], torch.zeros(3, 19)])
    with pytest.raises(ValueError, match="a_new"):
        orthogonality_penalty(torch.zeros(20), earlier)


# ---------------------------------------------------------------------------------------------------------------------
# Forgetting budget (trl_lifealign.defences.budget.math)
# ---------------------------------------------------------------------------------------------------------------------


class CountingEvaluate:
    """Synthetic scores of every earlier task at alpha, recording the calls."""

    def __init__(self, scores):
        self.scores, self.calls = scores, []

    def __call__(self, alpha):
        self.calls.append(alpha)
        return self.scores(alpha)


REFERENCES = [0.8, 0.6, 0.9]


def _feasible(scores, budget):
    return all(s >= r - budget for s, r in zip(scores, REFERENCES))


@pytest.mark.parametrize("max_evaluations", [3, 6, 10])
def test_budget_monotone_bisection(max_evaluations):
    slopes = [0.1, 0.4, 0.2]  # task 1 drops fastest: boundary at alpha* = budget / 0.4
    evaluate = CountingEvaluate(lambda a: [r - s * a for r, s in zip(REFERENCES, slopes)])
    result = largest_step_within_budget(evaluate, REFERENCES, budget=0.13, max_evaluations=max_evaluations)
    boundary = 0.13 / 0.4
    assert len(evaluate.calls) == max_evaluations == len(result.evaluations)
    assert evaluate.calls[:2] == [1.0, 0.0] and len(set(evaluate.calls)) == len(evaluate.calls)
    assert result.reachable and result.alpha <= boundary < result.alpha + 2.0 ** -(max_evaluations - 2)
    assert [a for a, _ in result.evaluations] == evaluate.calls
    assert result.drops == pytest.approx([s * result.alpha for s in slopes])
    assert result.alpha == max(a for a, scores in result.evaluations if _feasible(scores, 0.13))


def test_budget_early_exits():
    keep_all = CountingEvaluate(lambda a: [r - 0.01 * a for r in REFERENCES])
    result = largest_step_within_budget(keep_all, REFERENCES, budget=0.05)
    assert result.alpha == 1.0 and result.reachable and keep_all.calls == [1.0]
    assert result.drops == pytest.approx([0.01] * 3)
    lost = CountingEvaluate(lambda a: [REFERENCES[0], REFERENCES[1] - 0.3, REFERENCES[2]])  # already forgotten
    result = largest_step_within_budget(lost, REFERENCES, budget=0.1)
    assert result.alpha == 0.0 and not result.reachable and lost.calls == [1.0, 0.0]
    assert result.drops == pytest.approx([0.0, 0.3, 0.0])
    # No earlier task: nothing to forget, no call.
    nothing = CountingEvaluate(lambda a: [])
    result = largest_step_within_budget(nothing, [], budget=0.0)
    assert result.alpha == 1.0 and result.reachable and nothing.calls == [] and result.drops == []


def test_budget_non_monotone_and_nan():
    # Feasible on [0, 0.3] and [0.55, 0.8]: the search still returns the largest feasible alpha it evaluated.
    def scores(alpha):
        ok = alpha <= 0.3 or 0.55 <= alpha <= 0.8
        return [r - (0.0 if ok else 0.5) for r in REFERENCES]

    evaluate = CountingEvaluate(scores)
    result = largest_step_within_budget(evaluate, REFERENCES, budget=0.1, max_evaluations=8)
    assert len(evaluate.calls) == 8 and len(set(evaluate.calls)) == 8
    feasible = [a for a, s in result.evaluations if _feasible(s, 0.1)]
    assert result.alpha == max(feasible) and _feasible(scores(result.alpha), 0.1) and result.alpha > 0.0
    # A NaN score breaks the budget.
    nan_above = CountingEvaluate(lambda a: [float("nan") if a > 0.5 else r for r in REFERENCES])
    result = largest_step_within_budget(nan_above, REFERENCES, budget=0.0, max_evaluations=4)
    assert result.alpha == 0.5 and nan_above.calls == [1.0, 0.0, 0.5, 0.75]


def test_budget_errors():
    evaluate = CountingEvaluate(lambda a: [0.0, 0.0])
    with pytest.raises(ValueError, match="returned 2 scores for 3"):
        largest_step_within_budget(evaluate, REFERENCES, 0.1)
    with pytest.raises(ValueError, match="budget"):
        largest_step_within_budget(evaluate, REFERENCES, -0.1)
    with pytest.raises(ValueError, match="max_evaluations"):
        largest_step_within_budget(evaluate, REFERENCES, 0.1, max_evaluations=1)


# ---------------------------------------------------------------------------------------------------------------------
# Layer freezing (trl_lifealign.defences.freezing.math)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,index",
    [
        ("base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight", 3),
        ("base_model.model.transformer.h.11.attn.c_attn.lora_B.default.weight", 11),
        ("model.blocks.0.attn.lora_A.weight", 0),
        ("encoder.block.2.layer.1.DenseReluDense.wi.lora_A.default.weight", 2),  # T5: the block, not the sub-layer
        ("bert.encoder.layer.7.attention.self.query.lora_A.default.weight", 7),
        ("layers.12.mlp.weight", 12),
        ("base_model.model.model.embed_tokens.lora_embedding_A.default", None),
        ("base_model.model.lm_head.weight", None),
        ("model.layers_norm.3.weight", None),
        ("model.layers.x.weight", None),
    ],
)
def test_layer_index(name, index):
    assert layer_index(name) == index


def test_frozen_parameter_names():
    names = [
        "base_model.model.model.embed_tokens.lora_embedding_A.default",
        *[f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{f}.default.weight"
          for i in range(4) for m in ("q_proj", "v_proj") for f in "AB"],
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
        "base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector.default.weight",
    ]
    frozen = frozen_parameter_names(names, 2)
    assert frozen == [n for n in names if (".layers.0." in n or ".layers.1." in n) and "base_layer" not in n]
    assert len(frozen) == 9
    assert frozen_parameter_names(names, 0) == []
    assert len(frozen_parameter_names(iter(names), 100)) == 17  # every LoRA parameter inside a block
    assert is_lora_parameter(names[0]) and not is_lora_parameter(names[-2])
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="num_layers_frozen"):
            frozen_parameter_names(names, bad)
