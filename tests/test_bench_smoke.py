"""The lifelong benchmark (benchmarks/lifelong) on a few rows: data handling, runs on the lifelong runner, aggregation,
tables and resume."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from benchmarks.lifelong import aggregate as bench_aggregate
from benchmarks.lifelong import cli as bench_cli
from benchmarks.lifelong import data as bench_data
from benchmarks.lifelong import harness, render
from benchmarks.lifelong import settings as bench_settings
from trl_lifealign.lifelong.metrics import continual_metrics
from trl_lifealign.lifelong.report import LifelongReport, TaskRecord

TINY = dict(vocab_size=320, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, warmup_steps=4,
            warmup_batch_size=4, pairs=6, eval_pairs=None, max_prompt_tokens=12, max_completion_tokens=10,
            epochs=1.0, batch_size=4, learning_rate=1e-3, lora_r=2, lora_alpha=4, replay_capacity=10)

SUBJECTS = ["cat", "dog", "sun", "tree", "river", "bread", "train", "moon"]


def _task_rows(task_index: int, count: int) -> list[dict[str, str]]:
    rows = []
    for i in range(count):
        subject = SUBJECTS[(i + task_index) % len(SUBJECTS)]
        rows.append({"query": f"Human: Tell me about the {subject} number {i}.",
                     "chosen": f"Assistant: The {subject} is kind and calm, task {task_index}.",
                     "rejected": f"Assistant: No. The {subject} is loud {i}."})
    return rows


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Two tasks in the LifeAlign layout, with the real data's quirks: empty answer, chosen == rejected."""
    root = tmp_path_factory.mktemp("lifealign-data")
    for index, task in enumerate(("alpha", "beta")):
        train = _task_rows(index, 9)
        train[1]["rejected"] = ""  # bad: empty
        train[2]["rejected"] = train[2]["chosen"]  # bad: identical
        (root / task).mkdir()
        (root / task / "train.json").write_text(json.dumps(train))
        (root / task / "dev.json").write_text(json.dumps(_task_rows(index + 5, 4)))
    return root


def test_context_fitter_keeps_prompt_end_and_answer_start(tiny_tokenizer):
    fitter = bench_data.ContextFitter(tiny_tokenizer, max_prompt_tokens=4, max_completion_tokens=6)
    long_prompt = "What colour is the sky? " * 5 + "Where does the sun rise?"
    row = fitter.row({"prompt": long_prompt, "chosen": "The sky is blue.", "rejected": "The sky is green."})
    assert row["prompt"].endswith("rise?") and len(row["prompt"]) < 16  # the last 4 tokens
    assert row["chosen"] == "The sky is b" and row["rejected"] == "The sky is g"  # the first 6 tokens
    # Answers that only differ after the cut carry no preference any more: the pair is dropped.
    assert fitter.row({"prompt": "Q", "chosen": "The sky is blue. Yes", "rejected": "The sky is blue. No"}) is None


def test_settings_order_and_sweep_parsing():
    settings = bench_settings.BenchSettings()
    assert bench_settings.apply_settings(settings, {"theta": "0.5", "lr": "1e-3"}).energy_threshold == 0.5
    with pytest.raises(ValueError, match="unknown setting 'thetta'"):
        bench_settings.apply_settings(settings, {"thetta": "1"})
    with pytest.raises(ValueError, match="reference"):
        bench_settings.apply_settings(settings, {"reference": "previous"})
    tasks = list(bench_settings.PAPER_ORDER)
    assert bench_cli.resolve_order(tasks, ["5", "4", "3", "2", "1"]) == tuple(reversed(tasks))
    with pytest.raises(ValueError, match="permutation"):
        bench_cli.resolve_order(tasks, ["1", "1", "2", "3", "4"])
    assert bench_settings.parse_sweeps(["theta=0.5, 0.9", "lambda=0,1"]) == [("theta", ["0.5", "0.9"]),
                                                                          ("lambda", ["0", "1"])]
    specs = bench_settings.plan_runs(["seq-dpo", "lifealign"], [0, 1], [("theta", ["0.5"])], ["lifealign"])
    assert [s.variant for s in specs[:3]] == ["seq-dpo", "lifealign", "lifealign@theta=0.5"]
    assert [s.seed for s in specs] == [0, 0, 0, 1, 1, 1]


def test_cli_refuses_bad_options(capsys, data_root):
    assert bench_cli.main(["--data-root", str(data_root), "--set", "lambda=two"]) == 2
    assert "lambda" in capsys.readouterr().err


def _record(variant, seed, matrix, initial, seconds=1.0):
    names = ["a", "b"]
    tasks = [TaskRecord(name=names[i], row=[{"accuracy": v, "margin": 0.0} for v in row], seconds=seconds / len(matrix))
             for i, row in enumerate(matrix)]
    report = LifelongReport(task_names=names[:len(matrix)], eval_names=names, tasks=tasks,
                            initial_cells=[{"accuracy": v, "margin": 0.0} for v in initial])
    return {"variant": variant, "method": variant.split("@")[0], "seed": seed, "overrides": {}, "seconds": seconds,
            "report": report.to_dict()}


def test_aggregate_and_verdict_on_known_numbers():
    initial = [0.5, 0.5]
    records = []
    for seed, drop in enumerate((0.30, 0.34, 0.32)):
        records.append(_record("seq-dpo", seed, [[0.9, 0.5], [0.9 - drop, 0.9]], initial))
        records.append(_record("lifealign", seed, [[0.9, 0.5], [0.92, 0.9]], initial))
        records.append(_record("replay", seed, [[0.9, 0.5], [0.8, 0.9]], initial))
        records.append(_record("multi-task", seed, [[0.9, 0.9]], initial))
    summary = bench_aggregate.aggregate(records)
    assert summary["seq-dpo"]["bwt"]["mean"] == pytest.approx(-32.0)
    assert summary["seq-dpo"]["bwt"]["std"] == pytest.approx(2.0)
    assert summary["multi-task"]["bwt"]["mean"] is None or math.isnan(summary["multi-task"]["bwt"]["mean"])
    checks = {c["check"]: c["passed"] for c in bench_aggregate.verdict(summary)}
    assert all(checks.values()), checks
    assert len(checks) == 5
    markdown = render.render_markdown(summary, {"title": "t", "command": "c", "tasks": ["a", "b"], "eval_split": "dev",
                                               "seeds": [0, 1, 2], "setup": ""})
    assert "| Sequential DPO (SeqFT) | -32.00 ± 2.00 | 74.00 ± 1.00 |" in markdown
    assert "| ✓ | ✓ | +2.00 ± 0.00 | 91.00 ± 0.00 |" in markdown


def test_recommendation_judges_the_preset_methods():
    """The defences' bar is checked on the methods `preset: recommended` / `recommended-replay` give."""
    from trl_lifealign.lifelong.presets import BENCHMARK_METHOD

    initial, records = [0.5, 0.5], []
    for seed in range(2):
        records.append(_record(BENCHMARK_METHOD["recommended"], seed, [[0.9, 0.5], [0.91, 0.8]], initial))
        records.append(_record(BENCHMARK_METHOD["recommended-replay"], seed, [[0.9, 0.5], [0.85, 0.9]], initial))
        records.append(_record("multi-task", seed, [[0.9, 0.9 - 0.01 * seed]], initial))
    checks = bench_aggregate.recommendation(bench_aggregate.aggregate(records))
    assert [(c["check"].split(" (")[0], c["passed"]) for c in checks] == [
        ("`preset: recommended`", True), ("`preset: recommended`", False), ("`preset: recommended-replay`", False)]


def test_bench_end_to_end_and_resume(data_root, tmp_path, monkeypatch):
    """Two tiny tasks, LifeAlign + replay and multi-task on the real runner; a second call reuses both runs."""
    from trl_lifealign.lifelong import runner

    scored_initial = []
    score_initial = runner.initial_policy_logps
    monkeypatch.setattr(runner, "initial_policy_logps",
                        lambda *a, **k: scored_initial.append(1) or score_initial(*a, **k))
    settings = bench_settings.apply_settings(bench_settings.BenchSettings(tasks=("alpha", "beta")),
                                             {k: str(v) for k, v in TINY.items()})
    kwargs = dict(data_root=data_root, eval_root=data_root, eval_split="dev",
                  methods=["lifealign-replay", "multi-task"], seeds=[0], output_dir=tmp_path / "out", workers=1,
                  plots=False, log=lambda *_: None)
    payload = harness.run_benchmark(settings, **kwargs)
    assert len(scored_initial) == 1  # the second method reused the first one's π₀ log-probs

    data = {d["task"]: d for d in payload["data"]}
    assert data["alpha"]["train_skipped"] == {"field 'rejected' is empty": 1, "chosen is identical to rejected": 1}
    assert data["alpha"]["train_pairs"] == 6 and data["beta"]["eval_pairs"] == 4
    runs = {r["variant"]: r for r in payload["runs"]}
    life, multi = runs["lifealign-replay"], runs["multi-task"]
    life, multi = (bench_aggregate.run_view(r) for r in (life, multi))
    assert len(life["matrix"]) == 2 and len(multi["matrix"]) == 1 and len(multi["matrix"][0]) == 2
    assert life["initial_row"] == [0.5, 0.5] == multi["initial_row"]  # π₀ is the shared warm model
    for record in (life, multi):
        assert set(record["time_split"]) == {"training", "evaluation"}  # no generation in this setting
        assert 0 < sum(record["time_split"].values()) <= record["seconds"]
        expected = continual_metrics(record["matrix"], record["initial_row"])
        for key, value in expected.items():
            assert record["metrics"][key] == (None if value is None else pytest.approx(value))
    markdown = (tmp_path / "out" / "bench.md").read_text()
    assert "## Table 1: methods" in markdown and "LifeAlign + replay" in markdown
    assert "## Where the time goes" in markdown and "| variant | training | evaluation | total |" in markdown

    again = harness.run_benchmark(settings, **kwargs)  # resume: nothing re-trained
    assert {r["fingerprint"] for r in again["runs"]} == {r["fingerprint"] for r in payload["runs"]}
    assert again["seconds_total"] < payload["seconds_total"]
    # π₀ is loaded differently in bfloat16: the copied cache's key no longer matches, so it is scored again.
    bf16 = bench_settings.apply_settings(settings, {"dtype": "bfloat16"})
    (tmp_path / "bf16" / "runs" / "seq-dpo" / "seed0" / "runner").mkdir(parents=True)
    shutil.copy(tmp_path / "out" / "runs" / "multi-task" / "seed0" / "runner" / "initial_logps.json",
                tmp_path / "bf16" / "runs" / "seq-dpo" / "seed0" / "runner" / "initial_logps.json")
    scored_initial.clear()
    harness.run_benchmark(bf16, **{**kwargs, "methods": ["seq-dpo"], "output_dir": tmp_path / "bf16"})
    assert len(scored_initial) == 1
    changed = bench_settings.apply_settings(settings, {"lambda": "0.25"})
    with pytest.raises(RuntimeError, match="different settings"):
        harness.run_benchmark(changed, **kwargs)


def test_real_data_quirks_are_skipped_and_counted(shared_data_root, tiny_tokenizer, tmp_path):
    settings = bench_settings.BenchSettings(tasks=("HC3", "hh-rlhf-helpful-base"), pairs=4, eval_pairs=4)
    tasks = bench_data.prepare_task_data(settings, tiny_tokenizer, shared_data_root, shared_data_root, "dev",
                                         tmp_path)
    hc3, helpful = tasks
    assert hc3.train_skipped.get("field 'rejected' is empty") == 11
    assert helpful.train_skipped.get("chosen is identical to rejected") == 6
    assert all(not row["chosen"].startswith("Assistant:") for row in helpful.train_all)
    assert len(hc3.train) == 4 and len(helpful.eval) == 4


def _geometry_module():
    """benchmarks/forgetting_geometry.py (a script, not a package module)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "forgetting_geometry.py"
    spec = importlib.util.spec_from_file_location("forgetting_geometry", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_forgetting_geometry_reproduces_the_run(data_root, tmp_path):
    """benchmarks/forgetting_geometry.py merges each task's product update into the base weights: 'as trained' must
    reproduce the runner's own matrix row (scored through the LoRA layers), and λ = 1 must equal 'as trained'."""
    geometry = _geometry_module()

    settings = bench_settings.apply_settings(bench_settings.BenchSettings(tasks=("alpha", "beta")),
                                             {k: str(v) for k, v in TINY.items()})
    payload = harness.run_benchmark(settings, data_root=data_root, eval_root=data_root, eval_split="dev",
                                  methods=["seq-dpo"], seeds=[0], output_dir=tmp_path / "out", workers=1,
                                  plots=False, log=lambda *_: None)
    matrix = bench_aggregate.run_view(payload["runs"][0])["matrix"]
    result = geometry.analyse(tmp_path / "out" / "runs" / "seq-dpo" / "seed0" / "runner", lambdas=(1.0, 0.0))
    (step,) = result["projection"]
    assert step["before"] == pytest.approx(matrix[0], abs=1e-9)
    assert step["after"]["as trained"] == pytest.approx(matrix[1], abs=1e-9)
    assert step["after"]["product λ=1"] == pytest.approx(matrix[1], abs=1e-9)
    (shares,) = result["geometry"]
    assert 0.0 <= shares["in_span_factors"] <= 1.0 and 0.0 <= shares["in_span_product"] <= 1.0
    assert "| 02-beta |" in geometry.render(result)


def test_in_span_share_and_removal():
    import torch

    geometry = _geometry_module()
    e1, e2, e3 = torch.eye(3)
    update = torch.tensor([3.0, 4.0, 0.0])
    assert geometry.in_span_share([e1], update) == pytest.approx(0.6)
    assert geometry.in_span_share([e1, e2], update) == pytest.approx(1.0)
    assert geometry.in_span_share([], update) == 0.0
    assert torch.allclose(geometry.remove_in_span([e1], update, 0.0), torch.tensor([0.0, 4.0, 0.0]))
    assert torch.allclose(geometry.remove_in_span([e1 + e2], update, 0.5), torch.tensor([1.25, 2.25, 0.0]))
    assert torch.allclose(geometry.remove_in_span([], update, 0.0), update)


def test_warm_up_in_a_worker_prints_nothing_of_third_parties(tmp_path, tiny_tokenizer):
    """A spawned warm-up worker (``--workers 2``) shows no import-time notices or "Writing model shards" bars."""
    import subprocess
    import sys
    from pathlib import Path

    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    settings = json.dumps({**bench_settings.BenchSettings().__dict__, **TINY, "tasks": ["alpha"]})
    script = ("import json, sys; from benchmarks.lifelong.models import build_warm_model; "
              f"build_warm_model({str(tmp_path / 'warm')!r}, {str(tmp_path / 'tok')!r}, ['a b c'] * 8, "
              f"json.loads(sys.argv[1]), 0, 1)")
    result = subprocess.run([sys.executable, "-c", script, settings], capture_output=True, text=True, timeout=300,
                            cwd=str(Path(__file__).resolve().parents[1]))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "warm" / "warmup.json").is_file()
    assert result.stderr == "" and result.stdout == "", result.stderr + result.stdout


def test_holdout_split_is_disjoint_fixed_and_capped(tmp_path, data_root):
    from benchmarks import holdout_split

    counts = bench_data.write_holdout_split(data_root, tmp_path / "a", fraction=0.34)
    assert counts == {"alpha": (6, 3), "beta": (6, 3)}
    for task in ("alpha", "beta"):
        source = json.loads((data_root / task / "train.json").read_text())
        train = json.loads((tmp_path / "a" / task / "train.json").read_text())
        held = json.loads((tmp_path / "a" / task / "heldout.json").read_text())
        # Every source row in exactly one part, each part in source order.
        assert sorted(map(source.index, train + held)) == list(range(len(source)))
        assert [source.index(r) for r in train] == sorted(source.index(r) for r in train)
    assert holdout_split.main(["--data-root", str(data_root), "--output-dir", str(tmp_path / "b"),
                               "--fraction", "0.34"]) == 0
    held_a, held_b = ((tmp_path / d / "alpha" / "heldout.json").read_text() for d in ("a", "b"))
    assert held_a == held_b  # the shuffle is seeded: the same split every time
    assert bench_data.write_holdout_split(data_root, tmp_path / "c", fraction=0.5, max_pairs=2)["alpha"] == (7, 2)
    with pytest.raises(ValueError, match="fraction must be in"):
        bench_data.write_holdout_split(data_root, tmp_path / "d", fraction=1.0)
    assert holdout_split.main(["--data-root", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "e")]) == 2
