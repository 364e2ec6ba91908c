#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: builds (or reuses) both supported stacks, then runs
#   - the 'latest' stack (newest trl/transformers/peft + DeepSpeed + bitsandbytes): every test but the Axolotl ones;
#   - the 'axolotl' stack (Axolotl 0.19.0 with trl 1.9.0 pins, DeepSpeed 0.18.9): the core tests again, plus the
#     Axolotl tests (the Axolotl ZeRO-3 chain included; the other DeepSpeed tests run in 'latest').
# Extra arguments go to pytest in both stacks (e.g. `scripts/test.sh -k fpo -x`).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
export TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
latest="$(bash scripts/env.sh latest)"
axolotl="$(bash scripts/env.sh axolotl)"
core="$(bash scripts/env.sh core)"
status=0
echo "=== lint: ruff"
"$latest/bin/ruff" check . || status=$?
echo "=== core install (pip install ., no extras): lifealign demo"
bash scripts/check_core_demo.sh "$core" || status=$?
echo "=== stack: latest ($("$latest/bin/python" -c 'import trl, transformers, peft; print(f"trl {trl.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")'))"
LIFEALIGN_STACK=latest "$latest/bin/python" -m pytest -m "not axolotl" "$@" || status=$?
echo "=== stack: axolotl ($("$axolotl/bin/python" -c 'import trl, transformers, peft; print(f"trl {trl.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")'))"
LIFEALIGN_STACK=axolotl "$axolotl/bin/python" -m pytest -m "not bnb and (axolotl or not deepspeed)" "$@" || status=$?
exit $status
