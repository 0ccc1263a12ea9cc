#!/usr/bin/env bash
# Idempotent set-up: a cached virtualenv (outside the clone, keyed by requirements.txt),
# KPop installed into it in editable mode. Prints nothing but progress; sourced or run.
# Usage: source scripts/setup.sh   (exports KPOP_VENV and puts it first on PATH)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${KPOP_CACHE:-$HOME/.cache/kpop}"
VENV_LAYOUT=1  # bump when the way the venv is built below changes
KEY="$( (cat "$ROOT/requirements.txt"; echo "$VENV_LAYOUT") | sha256sum | cut -c1-12)"
export KPOP_VENV="${KPOP_VENV:-$CACHE/venv-$KEY}"
mkdir -p "$CACHE"
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
export PATH="$KPOP_VENV/bin:$PATH"
