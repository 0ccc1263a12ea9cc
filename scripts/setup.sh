#!/usr/bin/env bash
# Idempotent set-up: a cached virtualenv (outside the clone, keyed by requirements.txt),
# KPop installed into it in editable mode. Prints nothing but progress; sourced or run.
# Usage: source scripts/setup.sh   (exports KPOP_VENV and puts it first on PATH)
#
# Sourced, this file runs in the caller's shell, so it must leave that shell as it found it:
# the work runs in a subshell with its own `set -euo pipefail` (an interactive shell with
# errexit on closes at the first failing command), and only KPOP_VENV and PATH come back.
_kpop_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_kpop_cache="${KPOP_CACHE:-$HOME/.cache/kpop}"
_kpop_layout=1  # bump when the way the venv is built below changes
_kpop_key="$( (cat "$_kpop_root/requirements.txt"; echo "$_kpop_layout") | sha256sum | cut -c1-12)"
export KPOP_VENV="${KPOP_VENV:-$_kpop_cache/venv-$_kpop_key}"
(
  set -euo pipefail
  ROOT="$_kpop_root"
  mkdir -p "$_kpop_cache"
  if [ ! -f "$KPOP_VENV/.complete" ]; then
    echo "[kpop setup] building virtualenv $KPOP_VENV (first run only, ~5 min)"
    rm -rf "$KPOP_VENV"
    python3 -m venv "$KPOP_VENV"
    "$KPOP_VENV/bin/pip" install -q --upgrade pip wheel setuptools
    # The local CPU build of torch first: later packages then never pull a CUDA build.
    "$KPOP_VENV/bin/pip" install -q torch==2.13.0
    echo "torch==2.13.0" > "$KPOP_VENV/torch-constraint.txt"
    "$KPOP_VENV/bin/pip" install -q -r "$ROOT/requirements.txt" -c "$KPOP_VENV/torch-constraint.txt"
    # PyPI's torchvision/torchaudio/torchcodec are CUDA-linked and break `import vllm` beside CPU torch.
    "$KPOP_VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    touch "$KPOP_VENV/.complete"
  fi
  # Editable install of this clone (cheap; re-run so the venv points at this checkout).
  # (-I: ignore the current directory, so a checkout in $PWD does not pass for an install)
  if [ ! -x "$KPOP_VENV/bin/kpop" ] || ! "$KPOP_VENV/bin/python" -I -c "import kpop, pathlib, sys; sys.exit(pathlib.Path(kpop.__file__).resolve().parents[1] != pathlib.Path('$ROOT'))" 2>/dev/null; then
    "$KPOP_VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$ROOT"
  fi
)
_kpop_status=$?
unset _kpop_root _kpop_cache _kpop_layout _kpop_key
if [ "$_kpop_status" -ne 0 ]; then
  echo "[kpop setup] failed (exit $_kpop_status); see the messages above" >&2
  unset _kpop_status
  return 1 2>/dev/null || exit 1
fi
unset _kpop_status
export PATH="$KPOP_VENV/bin:$PATH"
