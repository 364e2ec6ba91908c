#!/usr/bin/env bash
# Create (or reuse) a virtual environment for one of the project's two supported stacks and print its path.
#
#   scripts/env.sh latest    newest trl / transformers / peft, with DeepSpeed and bitsandbytes (the default stack)
#   scripts/env.sh axolotl   Axolotl 0.19.0 and its exact pins (trl 1.9.0, transformers 5.16.1, peft 0.20.0), DeepSpeed 0.18.9
#   scripts/env.sh core      what `pip install .` gives a user: the core dependencies only, no extras (the project
#                            itself is re-installed from the checkout, non-editable, on every call)
#
# Environments are cached under $LIFEALIGN_ENV_ROOT (default ~/.cache/trl-lifealign/envs), keyed by a hash of
# everything that decides their content, so a second call is instant and an edited dependency list rebuilds.
# torch==2.13.0 is installed first: any other torch spec would pull gigabytes of CUDA wheels on a CPU machine.
set -euo pipefail
stack="${1:-latest}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="${LIFEALIGN_ENV_ROOT:-$HOME/.cache/trl-lifealign/envs}"
python="${PYTHON:-python3}"
case "$stack" in
  latest)  extras="test,eval,deepspeed,bitsandbytes,pretrained" ;;
  axolotl) extras="test,eval,deepspeed,pretrained" ;;
  core)    extras="" ;;
  *) echo "env.sh: unknown stack '$stack' (expected 'latest', 'axolotl' or 'core')" >&2; exit 2 ;;
esac
constraints="$repo/scripts/constraints-${stack/core/latest}.txt"
key="$( (cat "$repo/pyproject.toml" "$constraints"; echo "$stack $extras"; "$python" --version) | sha256sum | cut -c1-12)"
venv="$root/$stack-$key"
if [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"; mkdir -p "$root"
  echo "[env] building the '$stack' environment in $venv (first time only)" >&2
  "$python" -m venv "$venv"
  # The local package mirrors print one harmless "is ignored" warning per package: keep the log readable.
  pip() {
    "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; } >&2
    return "${PIPESTATUS[0]}"
  }
  pip install -U pip
  if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then pip install "torch==2.13.0"; fi
  if [ "$stack" = axolotl ]; then
    # Axolotl pulls its own exact pins; our package must resolve beside them.
    pip install -c "$constraints" "torch==2.13.0" "axolotl==0.19.0"
  fi
  if [ "$stack" = core ]; then
    pip install -c "$constraints" "torch==2.13.0" "$repo"
  else
    pip install -c "$constraints" "torch==2.13.0" -e "$repo[$extras]"
  fi
  touch "$venv/.complete"
fi
if [ "$stack" = core ]; then  # a user's install of this checkout: rebuilt from the sources every time (seconds)
  "$venv/bin/python" -m pip --disable-pip-version-check -q install --no-deps --force-reinstall "$repo" 2>&1 \
    | { grep -v "is ignored: it is neither" || true; } >&2
  echo "$venv"
  exit 0
fi
# An editable install records the checkout it was made from and the packages it found: re-point it when the cache is
# shared by several clones or a top-level package appeared since (otherwise the new one imports as an empty namespace).
stamp="$repo $(cd "$repo" && ls -d */__init__.py 2>/dev/null | tr '\n' ' ')"
if [ "$(cat "$venv/.editable-stamp" 2>/dev/null)" != "$stamp" ]; then
  "$venv/bin/python" -m pip --disable-pip-version-check -q install --no-deps -e "$repo" 2>&1 | { grep -v "is ignored: it is neither" || true; } >&2
  echo "$stamp" > "$venv/.editable-stamp"
fi
echo "$venv"
