"""SLMC math against an independent float64 numpy reference of the paper's construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _slmc_utils import reference_denoise, reference_sequence, rel_err

from trl_lifealign.slmc import consolidate_update, denoise_by_energy, extend_basis, split_by_span

SHAPES = [(4, 48), (40, 4), (8, 8)]  # lora_A-like, lora_B-like, square


def _low_rank_noisy(shape, rank, generator, noise=0.05):
    rows, cols = shape
    signal = torch.randn(rows, rank, generator=generator, dtype=torch.float64) @ torch.randn(
        rank, cols, generator=generator, dtype=torch.float64
    )
    return (signal + noise * torch.randn(rows, cols, generator=generator, dtype=torch.float64)).float()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("theta", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_denoise_matches_truncated_svd(shape, theta):
    update = _low_rank_noisy(shape, 2, torch.Generator().manual_seed(1))
    result = denoise_by_energy(update, theta)
    expected = reference_denoise(update.numpy(), theta)
    assert result.update.dtype == torch.float32 and result.update.shape == update.shape
    assert rel_err(result.update.numpy(), expected) < 1e-5
    assert result.kept_rank == np.linalg.matrix_rank(expected, tol=1e-6 * np.abs(expected).max())
    s = np.linalg.svd(update.double().numpy(), compute_uv=False)
    assert result.kept_energy == pytest.approx(float((s[: result.kept_rank] ** 2).sum() / (s**2).sum()), rel=1e-6)


def test_denoise_edge_cases():
    generator = torch.Generator().manual_seed(2)
    update = torch.randn(8, 64, generator=generator)
    # theta = 1 keeps the update bit for bit; theta = 0 keeps rank 1; all-zero stays zero.
    assert torch.equal(denoise_by_energy(update, 1.0).update, update)
    assert denoise_by_energy(update, 0.0).kept_rank == 1
    zero = denoise_by_energy(torch.zeros(4, 16), 0.9)
    assert zero.kept_rank == 0 and torch.count_nonzero(zero.update) == 0
    # bf16 input: math runs in float32 (torch has no bf16 SVD; the official code silently skipped it).
    bf16 = denoise_by_energy(update.bfloat16(), 0.5)
    assert bf16.update.dtype == torch.float32
    assert rel_err(bf16.update.numpy(), reference_denoise(update.bfloat16().float().numpy(), 0.5)) < 1e-5
    with pytest.raises(ValueError, match="energy_threshold"):
        denoise_by_energy(update, 1.5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("theta,lam", [(0.9, 0.5), (0.5, 0.0), (0.99, 0.1), (1.0, 0.3)])
def test_sequence_matches_paper_construction(shape, theta, lam):
    """Over 5 tasks, incremental basis + projection == SVD of the stacked history (paper), 1e-5 relative."""
    generator = torch.Generator().manual_seed(3)
    # Correlated tasks (shared component) so the projection matters.
    shared = _low_rank_noisy(shape, 1, generator)
    updates = [0.7 * shared + _low_rank_noisy(shape, 2, generator) for _ in range(5)]
    expected = reference_sequence([u.double().numpy() for u in updates], theta, lam)
    basis = None
    for task, (update, beta_ref) in enumerate(zip(updates, expected)):
        result = consolidate_update(update, basis, theta, lam)
        assert rel_err(result.update.numpy(), beta_ref) < 1e-5, f"task {task}"
        basis = result.basis
        # The incremental basis spans exactly the stacked history: same orthogonal projector as the SVD's.
        history = np.stack([b.ravel() for b in expected[: task + 1]])
        _, s, vt = np.linalg.svd(history, full_matrices=False)
        v = vt[s > 1e-6 * s.max()]
        assert basis.shape[0] == v.shape[0]
        projector = basis.double().T @ basis.double()
        assert np.abs(projector.numpy() - v.T @ v).max() < 1e-5
        assert np.abs((basis @ basis.T - torch.eye(basis.shape[0])).numpy()).max() < 1e-5
        if task > 0:
            assert 0.0 < result.conflict < 1.0


def test_overlap_weight_edge_cases():
    generator = torch.Generator().manual_seed(4)
    first, second = torch.randn(4, 32, generator=generator), torch.randn(4, 32, generator=generator)
    basis = consolidate_update(first, None, 0.9, 0.5).basis
    # lambda = 1 and theta = 1: the trained update comes back unchanged (bit for bit, flagged as such).
    keep = consolidate_update(second, basis, 1.0, 1.0)
    assert keep.unchanged and torch.equal(keep.update, second)
    # lambda = 0: pure orthogonal complement of the earlier span.
    orth = consolidate_update(second, basis, 1.0, 0.0)
    assert float((basis @ orth.update.reshape(-1)).abs().max()) < 1e-5 * float(second.norm())
    in_span, rest = split_by_span(second, basis)
    assert torch.allclose(orth.update.reshape(-1), rest, atol=1e-6)
    assert torch.allclose(in_span + rest, second.reshape(-1), atol=1e-6)
    # The conflict is the share of the denoised update's norm inside the span.
    assert orth.conflict == pytest.approx(float(in_span.norm() / second.norm()), rel=1e-5)
    with pytest.raises(ValueError, match="overlap_weight"):
        consolidate_update(second, basis, 0.9, 1.5)


def test_no_spurious_basis_directions():
    """Zero or dependent updates add no basis row (the official code adds arbitrary unit rows for them)."""
    generator = torch.Generator().manual_seed(5)
    update = torch.randn(4, 32, generator=generator)
    basis = extend_basis(None, update)
    assert basis.shape[0] == 1
    assert extend_basis(basis, torch.zeros(4, 32)).shape[0] == 1
    assert extend_basis(basis, 3.0 * update).shape[0] == 1
    zero = consolidate_update(torch.zeros(4, 32), basis, 0.9, 0.0)
    assert zero.new_direction is None and torch.count_nonzero(zero.update) == 0
    # An update inside the span with lambda = 0 leaves only rounding noise: it must not become a direction.
    inside = consolidate_update(2.0 * update, basis, 1.0, 0.0)
    assert inside.new_direction is None and float(inside.update.norm()) < 1e-5 * float(update.norm())


def test_non_finite_update_refused():
    update = torch.randn(4, 8)
    update[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        consolidate_update(update, None)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_consolidate_factor_matches_plain_path(lam):
    """The copy-free path (direction computed into the memory's spare row, snapshot added in place) used by the
    callback and the benchmark is bit-identical to consolidate_update + append_direction + snapshot + update."""
    from trl_lifealign.slmc import SLMCConfig
    from trl_lifealign.slmc.callback import consolidate_factor
    from trl_lifealign.slmc.memory import LongTermMemory, ModelSpec

    generator = torch.Generator().manual_seed(7)
    shapes = {"a": [4, 48], "b": [40, 4]}
    spec = ModelSpec(adapters={"default": {"rank": 4, "target_modules": ["q"]}}, factors=shapes)
    fast, plain = LongTermMemory(memory_dir=None, spec=spec), LongTermMemory(memory_dir=None, spec=spec)
    for task in range(7):  # crosses the buffer growth (4 spare rows) and includes a dependent (in-span) update
        for name, shape in shapes.items():
            snapshot = torch.randn(shape, generator=generator)
            update = _low_rank_noisy(shape, 2, generator)
            if task == 3:
                update = plain.basis(name)[0].reshape(shape).clone()
            expected = consolidate_update(update, plain.basis(name), 0.9, lam)
            if expected.new_direction is not None:
                plain.append_direction(name, expected.new_direction)
            value, result, stats = consolidate_factor(fast, name, update.clone(), snapshot, SLMCConfig(0.9, lam))
            assert torch.equal(value, snapshot + expected.update)
            assert torch.equal(fast.basis(name), plain.basis(name))
            assert result.conflict == expected.conflict and stats["kept_rank"] == expected.kept_rank


def test_consolidate_factor_after_an_update_that_added_no_direction():
    """A zero first update reserves the factor's spare row but adds no basis row; the next boundary must still see an
    empty basis (regression: KeyError in LongTermMemory.basis at the second boundary)."""
    from trl_lifealign.slmc import SLMCConfig
    from trl_lifealign.slmc.callback import consolidate_factor
    from trl_lifealign.slmc.memory import LongTermMemory, ModelSpec

    shape = [4, 24]
    spec = ModelSpec(adapters={"default": {"rank": 4, "target_modules": ["q"]}}, factors={"a": shape})
    memory = LongTermMemory(memory_dir=None, spec=spec)
    snapshot = torch.zeros(shape)
    value, result, _ = consolidate_factor(memory, "a", torch.zeros(shape), snapshot.clone(), SLMCConfig(0.9, 0.5))
    assert result.new_direction is None and torch.count_nonzero(value) == 0
    assert memory.basis("a").shape == (0, 96) and memory.basis_ranks() == {"a": 0} and memory.ram_bytes == 0
    update = _low_rank_noisy(shape, 2, torch.Generator().manual_seed(3))
    value, result, _ = consolidate_factor(memory, "a", update.clone(), snapshot.clone(), SLMCConfig(1.0, 0.5))
    assert torch.allclose(value, update, atol=1e-6)  # nothing earlier to overlap with: kept whole at theta = 1
    assert memory.basis("a").shape == (1, 96)
