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
# vLLM's Triton utilities and the CPU kernel tests' Triton interpreter (TRITON_INTERPRET=1 must be
# set before kernels are defined, so it holds for the whole process) cannot share a process:
# the vllm-marked tests run in a second one. Exit code 5 = no vllm test among those selected.
python -m pytest -q -ra -m "not vllm" "$@"
python -m pytest -q -ra -m vllm "$@" || [ $? -eq 5 ]
