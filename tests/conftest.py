"""Shared fixtures: tiny offline models, tokenizers and preference data (no hub access anywhere)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "lifealign"

# In CI each stack must really have what its tests need: a missing package fails instead of skipping silently.
REQUIRED_BY_STACK = {"latest": ["deepspeed", "bitsandbytes", "sacrebleu", "rouge_score", "matplotlib"],
                     "axolotl": ["axolotl"]}


def pytest_sessionstart(session):
    stack = os.environ.get("LIFEALIGN_STACK")
    missing = [m for m in REQUIRED_BY_STACK.get(stack, []) if importlib.util.find_spec(m) is None]
    if missing:
        raise pytest.UsageError(f"stack '{stack}' is missing {missing}; rebuild it with scripts/env.sh {stack}")


def pytest_collection_modifyitems(config, items):
    have_axolotl = importlib.util.find_spec("axolotl") is not None
    for item in items:
        if "axolotl" in item.keywords and not have_axolotl:
            item.add_marker(pytest.mark.skip(reason="needs Axolotl 0.19 (the 'axolotl' stack)"))


PREFERENCE_ROWS = [
    {"prompt": "What colour is the sky?", "chosen": "The sky is blue.", "rejected": "The sky is green."},
    {"prompt": "How many legs has a cat?", "chosen": "A cat has four legs.", "rejected": "A cat has nine legs."},
    {"prompt": "What is two plus two?", "chosen": "Two plus two is four.", "rejected": "Two plus two is five."},
    {"prompt": "Where does the sun rise?", "chosen": "The sun rises in the east.", "rejected": "It rises in the west."},
    {"prompt": "Is water wet?", "chosen": "Yes, water is wet.", "rejected": "No, water is dry."},
    {"prompt": "What do bees make?", "chosen": "Bees make honey.", "rejected": "Bees make milk."},
    {"prompt": "Which is larger, 3 or 7?", "chosen": "Seven is larger.", "rejected": "Three is larger."},
    {"prompt": "What do cows drink?", "chosen": "Cows drink water.", "rejected": "Cows drink milk."},
]


@pytest.fixture(scope="session")
def preference_rows():
    return [dict(row) for row in PREFERENCE_ROWS]


@pytest.fixture(scope="session")
def tiny_tokenizer(preference_rows):
    from trl_lifealign.tiny import train_tokenizer

    texts = [text for row in preference_rows for text in row.values()]
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture
def tiny_model(tiny_tokenizer):
    from trl_lifealign.tiny import build_tiny_llama

    return build_tiny_llama(tiny_tokenizer, seed=0)


@pytest.fixture(scope="session")
def shared_data_root():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real preference data not present at {SHARED_DATA}")
    return SHARED_DATA
