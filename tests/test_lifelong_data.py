"""Data loading and validation: every quirk of the real LifeAlign files, reproduced on small synthetic rows."""

import json

import pytest

from trl_lifealign.lifelong.data import BadRecordError, DataSource, load_preference_data

GOOD = {"query": "Human: hi\nAssistant: hello\nHuman: how are you?", "chosen": "Assistant: Fine, thanks.",
        "rejected": "Assistant: Go away."}


def write_json(tmp_path, rows, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def source(path, **kwargs):
    return DataSource(path=str(path), columns={"query": "prompt"}, **kwargs)


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ({**GOOD, "rejected": ""}, "row 1: field 'rejected' is empty"),  # HC3: 11 empty rejected
        ({**GOOD, "chosen": "   "}, "row 1: field 'chosen' is empty"),  # safe-rlhf: 12 empty chosen
        ({**GOOD, "rejected": GOOD["chosen"]}, "row 1: chosen is identical to rejected"),  # helpful-base: 6 pairs
        ({"query": "q", "chosen": "a"}, "row 1: field 'rejected' is missing"),
        ({**GOOD, "chosen": 3}, "row 1: field 'chosen' must be a string or a list of messages, got int"),
        ({**GOOD, "query": None}, "row 1: field 'prompt' is missing"),
        (["not", "an", "object"], "row 1: record must be an object, got list"),
    ],
)
def test_bad_rows_raise_with_file_and_row(tmp_path, bad_row, message):
    path = write_json(tmp_path, [GOOD, bad_row, GOOD])
    with pytest.raises(BadRecordError) as error:
        load_preference_data(source(path))
    assert str(path) in str(error.value) and message in str(error.value)


def test_skip_bad_rows_counts_by_reason(tmp_path):
    rows = [GOOD, {**GOOD, "rejected": ""}, {**GOOD, "chosen": ""}, {**GOOD, "rejected": ""},
            {**GOOD, "rejected": GOOD["chosen"]}, {**GOOD, "chosen": 1.5}, GOOD]
    data = load_preference_data(source(write_json(tmp_path, rows)), skip_bad_rows=True)
    assert len(data.rows) == 2
    assert data.skipped == {"field 'rejected' is empty": 2, "field 'chosen' is empty": 1,
                            "chosen is identical to rejected": 1,
                            "field 'chosen' must be a string or a list of messages, got float": 1}
    summary = data.summary()
    assert summary["skipped_total"] == 5 and summary["rows_read"] == 7 and summary["rows_used"] == 2
    assert data.duplicate_prompts == 1  # the two GOOD rows share their (multi-turn) query


def test_assistant_prefix_kept_by_default_and_stripped_on_request(tmp_path):
    path = write_json(tmp_path, [GOOD])
    assert load_preference_data(source(path)).rows[0]["chosen"] == "Assistant: Fine, thanks."
    stripped = load_preference_data(source(path, strip_response_prefix="Assistant:")).rows[0]
    assert stripped == {"prompt": GOOD["query"], "chosen": "Fine, thanks.", "rejected": "Go away."}
    # A response that is only the tag is empty once stripped: a bad row.
    only_tag = write_json(tmp_path, [{**GOOD, "rejected": "Assistant:"}], "tag.json")
    with pytest.raises(BadRecordError, match="row 0: a response is empty after removing the prefix"):
        load_preference_data(source(only_tag, strip_response_prefix="Assistant:"))


def test_truthfulqa_semicolon_joined_rejected(tmp_path):
    row = {"query": "Is the earth flat?", "chosen": "No, it is round",
           "rejected": "Yes, it is flat; Yes, it is a disc;  ;No, it is round"}
    path = write_json(tmp_path, [row])
    plain = load_preference_data(source(path))
    assert len(plain.rows) == 1 and ";" in plain.rows[0]["rejected"]
    split = load_preference_data(source(path, rejected_separator=";"))
    # Empty parts and a part equal to chosen are dropped; one pair per remaining wrong answer.
    assert [r["rejected"] for r in split.rows] == ["Yes, it is flat", "Yes, it is a disc"]
    assert split.expanded_pairs == 1 and split.duplicate_prompts == 0


def test_jsonl_parquet_conversational_and_limit(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert len(load_preference_data(DataSource(path=str(jsonl))).rows) == 5
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    assert load_preference_data(DataSource(path=str(parquet), limit=2)).rows == rows[:2]

    conversational = [{"prompt": [{"role": "user", "content": "hi"}],
                       "chosen": [{"role": "assistant", "content": "hello"}],
                       "rejected": [{"role": "assistant", "content": "bye"}]}]
    assert load_preference_data(DataSource(path=str(write_json(tmp_path, conversational, "c.json")))).rows == \
        conversational
    empty_message = [{**conversational[0], "chosen": [{"role": "assistant", "content": ""}]}]
    with pytest.raises(BadRecordError, match="row 0: field 'chosen' message 0 has empty content"):
        load_preference_data(DataSource(path=str(write_json(tmp_path, empty_message, "e.json"))))
    mixed = [{**conversational[0], "rejected": "bye"}]
    with pytest.raises(BadRecordError, match="both be strings or both be message lists"):
        load_preference_data(DataSource(path=str(write_json(tmp_path, mixed, "m.json"))))


def test_source_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of 'path' or 'dataset'"):
        DataSource()
    with pytest.raises(ValueError, match="targets must be one of"):
        DataSource(path="x.json", columns={"query": "question"})
    with pytest.raises(FileNotFoundError, match="not found"):
        load_preference_data(DataSource(path=str(tmp_path / "missing.json")))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_preference_data(DataSource(path=str(bad)))
    with pytest.raises(BadRecordError, match="no usable preference records"):
        load_preference_data(source(write_json(tmp_path, [{**GOOD, "chosen": ""}], "all_bad.json")),
                             skip_bad_rows=True)


def test_local_hf_dataset_dir(tmp_path):
    import datasets

    rows = [{"question": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(4)]
    datasets.Dataset.from_list(rows).to_json(str(tmp_path / "hf" / "train.jsonl"))
    data = load_preference_data(DataSource(dataset=str(tmp_path / "hf"), split="train",
                                           columns={"question": "prompt"}))
    assert data.rows[0] == {"prompt": "q0", "chosen": "yes 0", "rejected": "no 0"}
    assert data.origin.endswith("[train]")


def test_real_data_quirks_are_counted(shared_data_root):
    """The real files (when present): skip mode counts exactly the bad rows the data README lists."""
    data = load_preference_data(DataSource(path=str(shared_data_root / "hh-rlhf-helpful-base" / "train.json"),
                                           columns={"query": "prompt"}), skip_bad_rows=True)
    assert data.skipped == {"chosen is identical to rejected": 6}
    with pytest.raises(BadRecordError, match=r"HC3/train.json row \d+: field 'rejected' is empty"):
        load_preference_data(DataSource(path=str(shared_data_root / "HC3" / "train.json"),
                                        columns={"query": "prompt"}))


def test_demo_tasks_conflict_and_are_valid(tmp_path):
    from trl_lifealign.lifelong.demo import make_demo_tasks, write_demo_data

    tasks = make_demo_tasks(6, 3)
    assert list(tasks) == ["concise", "polite", "detailed"]
    for row in tasks["concise"]["train"]:
        assert len(row["chosen"]) < len(row["rejected"])  # concise prefers the short answer...
    for row in tasks["detailed"]["train"]:
        assert len(row["chosen"]) > len(row["rejected"])  # ...detailed the long one
    prompts = [r["prompt"] for t in tasks.values() for split in t.values() for r in split]
    assert len(prompts) == len(set(prompts))  # train and eval questions are disjoint, across tasks too
    paths = write_demo_data(tmp_path, 6, 3)
    data = load_preference_data(DataSource(path=str(paths["polite"]["eval"]), columns={"query": "prompt"}))
    assert len(data.rows) == 3 and data.skipped == {}
    # A subsequence keeps each task's own rows (the SmolLM2 demo runs concise -> detailed only).
    pair = make_demo_tasks(6, 3, names=("concise", "detailed"))
    assert list(pair) == ["concise", "detailed"] and pair["detailed"] == tasks["detailed"]
    with pytest.raises(ValueError, match="distinct demo tasks"):
        make_demo_tasks(6, 3, names=("concise", "concise"))
