"""Preference data for lifelong runs: where it comes from (`DataSource`), loading and record-by-record validation.

A preference record is `{"prompt", "chosen", "rejected"}`, each either a non-empty string (standard format) or a list
of `{"role", "content"}` messages (conversational format, as TRL accepts). Every record is checked; a bad one raises
`BadRecordError` naming the file (or dataset) and the 0-based row, unless the caller asks to skip bad rows, in which
case it is dropped and counted by reason in `PreferenceData.skipped`.

Real preference data has quirks this module handles explicitly (see `DataSource`):
- empty `chosen` / `rejected` strings and pairs whose `chosen` equals `rejected` (bad rows: error or skip);
- responses that start with the speaker tag `"Assistant:"` (hh-rlhf): `strip_response_prefix` removes it, otherwise
  the tag becomes part of the learned response;
- a `rejected` field holding several wrong answers joined by `";"` (TruthfulQA): `rejected_separator` expands the
  record into one pair per wrong answer;
- repeated prompts: kept (they are legitimate pairs) and counted in `PreferenceData.duplicate_prompts`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LifeAlignError

FIELDS = ("prompt", "chosen", "rejected")


class DataError(LifeAlignError, ValueError):
    """A data file or dataset cannot be read (missing, not UTF-8, not JSON, wrong layout); the message names it."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file named by a source does not exist."""


class BadRecordError(DataError):
    """A preference record that cannot be trained on; the message names the origin (file/dataset) and the row."""


@dataclass
class DataSource:
    """Where a preference dataset comes from.

    Exactly one of `path` (a local `.json` list / `.jsonl` / `.parquet` file) and `dataset` (a Hugging Face dataset
    name, or a local dataset folder, loaded with `datasets.load_dataset(dataset, dataset_config, split=split)`)
    must be given.

    Example: the LifeAlign files use `query`/`chosen`/`rejected`:
    `DataSource(path="hh-rlhf-helpful-base/train.json", columns={"query": "prompt"},
    strip_response_prefix="Assistant:")`.
    """

    path: str | None = field(default=None, metadata={"help": "Local .json (list of objects), .jsonl or .parquet file."})
    dataset: str | None = field(default=None, metadata={"help": "Hugging Face dataset name (or local dataset dir)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name, if any."})
    split: str = field(default="train", metadata={"help": "Split to load from `dataset` (ignored for files)."})
    columns: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "Rename source columns to prompt/chosen/rejected, e.g. {'query': 'prompt'}."},
    )
    limit: int | None = field(default=None, metadata={"help": "Keep only the first `limit` valid rows (None: all)."})
    strip_response_prefix: str | None = field(
        default=None,
        metadata={"help": "Remove this prefix (e.g. 'Assistant:') and the following spaces from string responses."},
    )
    rejected_separator: str | None = field(
        default=None,
        metadata={"help": "Split string `rejected` on this separator (e.g. ';') into one pair per rejected answer."},
    )

    def __post_init__(self):
        if (self.path is None) == (self.dataset is None):
            raise ValueError(f"DataSource needs exactly one of 'path' or 'dataset' (got path={self.path!r}, "
                             f"dataset={self.dataset!r})")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"DataSource.limit must be a positive integer or None, got {self.limit!r}")
        for target in self.columns.values():
            if target not in FIELDS:
                raise ValueError(f"DataSource.columns maps to {target!r}; targets must be one of {list(FIELDS)}")

    @property
    def origin(self) -> str:
        """A human-readable name of the source, used in error messages and reports."""
        if self.path is not None:
            return str(self.path)
        config = f"/{self.dataset_config}" if self.dataset_config else ""
        return f"{self.dataset}{config}[{self.split}]"


@dataclass
class PreferenceData:
    """Validated preference rows plus what validation found."""

    rows: list[dict[str, Any]]
    origin: str
    total_rows: int
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    duplicate_prompts: int = 0
    expanded_pairs: int = 0  # extra pairs created by `rejected_separator`

    def digest(self) -> str:
        """A content digest of the validated rows (what a run trains or scores on, wherever the file lives)."""
        return hashlib.sha256(json.dumps(self.rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        """Counts for the run report."""
        return {"origin": self.origin, "rows_read": self.total_rows, "rows_used": len(self.rows),
                "skipped": dict(self.skipped), "skipped_total": sum(self.skipped.values()),
                "duplicate_prompts": self.duplicate_prompts, "expanded_pairs": self.expanded_pairs}


def _read_raw_rows(source: DataSource) -> list[Any]:
    if source.path is not None:
        path = Path(source.path)
        if not path.is_file():
            raise DataFileNotFoundError(f"preference data file not found: {path}")
        suffix = path.suffix.lower()
        if suffix in (".json", ".jsonl"):
            return _read_json_rows(path, lines=suffix == ".jsonl")
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        raise DataError(f"{path}: unsupported file type {suffix!r} (use .json, .jsonl or .parquet)")
    import datasets

    loaded = datasets.load_dataset(source.dataset, source.dataset_config, split=source.split)
    return list(loaded)


def _read_json_rows(path: Path, lines: bool) -> list[Any]:
    """Records of a JSON list (``{"train": [...]}`` accepted) or JSON Lines file; UTF-8, with or without a BOM."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error}); re-encode the file as UTF-8") from None
    if lines:
        rows = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError(f"{path} line {line_number}: not valid JSON ({error})") from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error}); JSON Lines files must end in .jsonl") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"train": [...]} style
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def as_conversation(row: dict[str, Any]) -> dict[str, Any]:
    """A string pair as chat messages (the prompt as one user turn, each answer as one assistant turn), so that TRL,
    the evaluation and generation format it with the tokenizer's chat template; message lists are returned as is."""
    if not isinstance(row["prompt"], str):
        return row
    return {"prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def _check_value(name: str, value: Any) -> str | None:
    """Return the reason `value` is not a usable prompt/chosen/rejected, or None if it is."""
    if value is None:
        return f"field '{name}' is missing"
    if isinstance(value, str):
        return f"field '{name}' is empty" if not value.strip() else None
    if _is_messages(value):
        if not value:
            return f"field '{name}' is an empty message list"
        for index, message in enumerate(value):
            if set(message) - {"role", "content"} or "role" not in message or "content" not in message:
                return f"field '{name}' message {index} must have exactly 'role' and 'content' keys"
            if not isinstance(message["role"], str) or not isinstance(message["content"], str):
                return f"field '{name}' message {index}: role and content must be strings"
            if not message["content"].strip():
                return f"field '{name}' message {index} has empty content"
        return None
    return f"field '{name}' must be a string or a list of messages, got {type(value).__name__}"


def _strip_prefix(text: str, prefix: str) -> str:
    stripped = text.lstrip()
    return stripped[len(prefix):].lstrip() if stripped.startswith(prefix) else text


def load_preference_data(source: DataSource, skip_bad_rows: bool = False) -> PreferenceData:
    """Load and validate the preference records of `source`.

    Args:
        source: where the data is and how its columns map to prompt/chosen/rejected.
        skip_bad_rows: drop invalid records (counted by reason in the result) instead of raising.

    Raises:
        BadRecordError: on the first invalid record (missing or empty field, non-string value, chosen identical to
            rejected), naming `source.origin` and the 0-based row, unless `skip_bad_rows`.
    """
    raw_rows = _read_raw_rows(source)
    rows: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    expanded = 0

    accepted_prompts: list[str] = []

    def bad(row_index: int, reason: str) -> None:
        if not skip_bad_rows:
            raise BadRecordError(f"{source.origin} row {row_index}: {reason} (set skip_bad_rows to skip such rows)")
        skipped[reason] += 1

    for row_index, raw in enumerate(raw_rows):
        if source.limit is not None and len(rows) >= source.limit:
            break
        if not isinstance(raw, dict):
            bad(row_index, f"record must be an object, got {type(raw).__name__}")
            continue
        collision = next((k for k, t in source.columns.items() if k in raw and t in raw and t not in source.columns),
                         None)
        if collision is not None:
            target = source.columns[collision]
            raise DataError(f"{source.origin} row {row_index}: column {collision!r} is mapped to {target!r}, but the "
                            f"record already has a {target!r} column; map or drop one of them")
        record = {source.columns.get(key, key): value for key, value in raw.items()}
        reasons = [r for r in (_check_value(name, record.get(name)) for name in FIELDS) if r]
        if reasons:
            bad(row_index, reasons[0])
            continue
        prompt, chosen, rejected = (record[name] for name in FIELDS)
        if isinstance(chosen, str) != isinstance(rejected, str):
            bad(row_index, "chosen and rejected must both be strings or both be message lists")
            continue
        if source.strip_response_prefix and isinstance(chosen, str):
            chosen = _strip_prefix(chosen, source.strip_response_prefix)
            rejected = _strip_prefix(rejected, source.strip_response_prefix)
            if not chosen.strip() or not rejected.strip():
                bad(row_index, f"a response is empty after removing the prefix {source.strip_response_prefix!r}")
                continue
        rejected_list = [rejected]
        if source.rejected_separator and isinstance(rejected, str):
            rejected_list = [part.strip() for part in rejected.split(source.rejected_separator) if part.strip()]
            if not rejected_list:
                bad(row_index, f"field 'rejected' is empty after splitting on {source.rejected_separator!r}")
                continue
        kept = [r for r in rejected_list if r != chosen]
        if not kept:
            bad(row_index, "chosen is identical to rejected")
            continue
        for rejected_item in kept:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected_item})
        expanded += len(kept) - 1
        accepted_prompts.append(json.dumps(prompt, sort_keys=True))

    # A prompt repeated across records (not across the pairs one record was expanded into).
    duplicates = sum(count - 1 for count in Counter(accepted_prompts).values())
    if not rows:
        raise BadRecordError(f"{source.origin}: no usable preference records (read {len(raw_rows)}, "
                             f"skipped {dict(skipped)})")
    return PreferenceData(rows=rows, origin=source.origin, total_rows=len(raw_rows), skipped=dict(skipped),
                          duplicate_prompts=duplicates, expanded_pairs=expanded)
