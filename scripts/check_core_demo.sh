#!/usr/bin/env bash
# What a user gets from `pip install .` (no extras): `lifealign --help` and `lifealign demo` must run to the end,
# with no third-party warning or progress bar in their output, and the report written without matplotlib.
#   scripts/check_core_demo.sh VENV
set -euo pipefail
venv="$1"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$venv/bin/lifealign" --help > /dev/null
if ! "$venv/bin/lifealign" demo --output-dir "$out/demo" > "$out/log" 2>&1; then
  cat "$out/log"; echo "check_core_demo: lifealign demo failed in the core-only environment" >&2; exit 1
fi
cat "$out/log"
if grep -Ein "warn|examples/s|Tokenizing|Adding EOS|Map:|Filter:" "$out/log"; then
  echo "check_core_demo: the demo's output holds a warning or a third-party progress bar (lines above)" >&2; exit 1
fi
grep -q "plots skipped: matplotlib is not installed" "$out/log" || { echo "check_core_demo: no plots hint" >&2; exit 1; }
test -s "$out/demo/lifealign/report.md" || { echo "check_core_demo: no report.md" >&2; exit 1; }
echo "check_core_demo: ok"
