#!/usr/bin/env bash
# The main job on the embedded default: builds (or reuses) the 'latest' stack, then runs `lifealign demo`, fully
# offline (a tiny model, a tokenizer and synthetic preference tasks it generates itself). Arguments go to the demo.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
venv="$(bash "$repo/scripts/env.sh" latest)"
exec "$venv/bin/lifealign" demo "$@"
