#!/usr/bin/env bash
# The main job on a fresh machine: Python env, Debian packages, then a real training run of
# configs/quickstart.yaml (local Ray, embedded Redis, tiny Ring-2.6 policy) into runs/quickstart/.
# Extra arguments are config overrides, e.g. `bash scripts/quickstart.sh schedule.rl_steps=5`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup.sh
bash scripts/system.sh
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/kpop/torch_extensions}"
exec kpop train configs/quickstart.yaml "$@"
