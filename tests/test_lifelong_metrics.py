"""Continual metrics against hand-computed matrices; preference accuracy with ties; the replay rule."""

import pytest

from trl_lifealign.lifelong.metrics import continual_metrics, preference_accuracy
from trl_lifealign.lifelong.replay import ReplayBuffer


def test_metrics_three_tasks_by_hand():
    matrix = [[0.8, 0.4, 0.5],
              [0.6, 0.9, 0.3],
              [0.5, 0.7, 0.95]]
    initial = [0.5, 0.5, 0.5]
    m = continual_metrics(matrix, initial)
    assert m["last"] == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    # AP: row 1 first 1 entry, row 2 first 2, row 3 all 3; averaged over the rows.
    assert m["ap"] == pytest.approx((0.8 + (0.6 + 0.9) / 2 + (0.5 + 0.7 + 0.95) / 3) / 3)
    # BWT: (R[3][1] - R[1][1] + R[3][2] - R[2][2]) / 2
    assert m["bwt"] == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)
    # FWT: (R[1][2] - R0[2] + R[2][3] - R0[3]) / 2
    assert m["fwt"] == pytest.approx(((0.4 - 0.5) + (0.3 - 0.5)) / 2)


def test_metrics_extra_eval_columns_and_single_task():
    # 2 tasks, 3 eval columns (an extra held-out set): Last spans all columns, the rest only task columns.
    m = continual_metrics([[1.0, 0.0, 0.2], [0.5, 1.0, 0.4]], [0.5, 0.25, 0.5])
    assert m["last"] == pytest.approx((0.5 + 1.0 + 0.4) / 3)
    assert m["ap"] == pytest.approx((1.0 + 0.75) / 2)
    assert m["bwt"] == pytest.approx(-0.5)
    assert m["fwt"] == pytest.approx(0.0 - 0.25)
    single = continual_metrics([[0.7]], [0.5])
    assert single == {"last": 0.7, "ap": 0.7, "bwt": None, "fwt": None}
    assert continual_metrics([[0.7, 0.1], [0.2, 0.3]])["fwt"] is None


def test_metrics_reject_malformed_matrices():
    with pytest.raises(ValueError, match="no rows"):
        continual_metrics([])
    with pytest.raises(ValueError, match="row 1 has 1 entries"):
        continual_metrics([[0.1, 0.2], [0.3]])
    with pytest.raises(ValueError, match="only 1 evaluation columns"):
        continual_metrics([[0.1], [0.2]])
    with pytest.raises(ValueError, match="initial_row has 1"):
        continual_metrics([[0.1, 0.2], [0.3, 0.4]], [0.5])


def test_preference_accuracy_counts_ties_as_half():
    assert preference_accuracy([0.0, 0.0, 0.0]) == 0.5  # untrained model
    assert preference_accuracy([1.0, -1.0, 0.0, 2.0]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert preference_accuracy([1e-7, -1e-7]) == 0.5  # float noise is a tie
    with pytest.raises(ValueError, match="non-finite"):
        preference_accuracy([float("nan")])
    with pytest.raises(ValueError):
        preference_accuracy([])


def test_replay_random_fraction_fifo_drop_oldest(tmp_path):
    buffer = ReplayBuffer(fraction=0.5, capacity=6, seed=3)
    rows = {name: [{"prompt": f"{name}{i}", "chosen": "a", "rejected": "b"} for i in range(8)] for name in "abc"}
    assert buffer.add_task("a", 0, rows["a"]) == 4
    first = [r["prompt"] for r in buffer.rows()]
    buffer.add_task("b", 1, rows["b"])
    assert buffer.counts_by_task() == {"a": 2, "b": 4}  # capacity 6: the two oldest 'a' rows were dropped
    assert [r["prompt"] for r in buffer.rows()][:2] == first[2:]
    buffer.add_task("c", 2, rows["c"])
    assert buffer.counts_by_task() == {"b": 2, "c": 4}
    buffer.save(tmp_path / "replay.json")
    again = ReplayBuffer.load(tmp_path / "replay.json")
    assert again.rows() == buffer.rows()
    # Same seed and task index -> same sample; different seed -> (for these sizes) a different one.
    other = ReplayBuffer(0.5, 100, seed=3)
    other.add_task("a", 0, rows["a"])
    assert [r["prompt"] for r in other.rows()] == first
    samples = set()
    for seed in range(6):
        probe = ReplayBuffer(0.5, 100, seed=seed)
        probe.add_task("a", 0, rows["a"])
        samples.add(tuple(r["prompt"] for r in probe.rows()))
    assert len(samples) > 1  # random, not the first 50% every time
    assert ReplayBuffer(0.0, 10).add_task("a", 0, rows["a"]) == 0


def test_metrics_with_cells_left_out():
    """Generation scored on the diagonal and the last row only: BWT and Last are defined, AP and FWT are not."""
    matrix = [[0.6, None, None], [None, 0.7, None], [0.5, 0.65, 0.8]]
    metrics = continual_metrics(matrix, [0.3, 0.4, 0.5])
    assert metrics["last"] == pytest.approx((0.5 + 0.65 + 0.8) / 3)
    assert metrics["bwt"] == pytest.approx(((0.5 - 0.6) + (0.65 - 0.7)) / 2)
    assert metrics["ap"] is None and metrics["fwt"] is None
