#!/usr/bin/env bash
# The main job on a fresh machine: Python env, Debian packages, then a real training run of
# configs/quickstart.yaml (local Ray, embedded Redis, tiny Ring-2.6 policy) into runs/quickstart/.
# Extra arguments are config overrides, e.g. `bash scripts/quickstart.sh schedule.rl_steps=5`; another
# seed, in its own run directory: `bash scripts/quickstart.sh seed=1 name=quickstart-s1` (re-running
# into an existing run directory resumes that run instead).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup.sh
bash scripts/system.sh
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/kpop/torch_extensions}"
exec kpop train configs/quickstart.yaml "$@"
