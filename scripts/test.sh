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
exec python -m pytest -q -ra "$@"
