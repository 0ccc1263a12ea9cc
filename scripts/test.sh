#!/usr/bin/env bash
# The whole test suite on a fresh machine: Python env, Debian packages, docker daemon and
# sandbox image (cached), then pytest. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup.sh
bash scripts/system.sh
bash scripts/docker.sh
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/kpop/torch_extensions}"
if [ $# -gt 0 ]; then
  case "$*" in *test_vllm_*) export TRITON_INTERPRET=0 ;; esac  # see below
  exec python -m pytest -q -ra "$@"
fi
# The vLLM tests run in a process of their own: vLLM patches its Triton kernels by scanning every
# module in sys.modules, and some modules other tests import (llvmlite's ffi via numba) break that
# scan; and on CPU tests/conftest.py turns on Triton's interpreter for the whole process.
python -m pytest -q -ra --ignore-glob='tests/test_vllm_*.py'
TRITON_INTERPRET=0 python -m pytest -q -ra tests/test_vllm_*.py
