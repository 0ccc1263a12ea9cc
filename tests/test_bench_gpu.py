"""bench/gpu.py without a GPU: it refuses cleanly (one JSON object last, no traceback), and its
FLOP and parameter arithmetic matches the issue's numbers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_cleanly_without_cuda():
    env = dict(os.environ, PYTHONPATH=REPO)
    run = subprocess.run([sys.executable, "bench/gpu.py", "--json"], cwd=REPO, capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 2
    assert "needs a CUDA GPU" in run.stderr and "Traceback" not in run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"error": run.stderr.strip()}


def test_unknown_part_is_named(capsys):
    sys.path.insert(0, REPO)
    from bench.gpu import main

    with pytest.raises(SystemExit) as exc:
        main(["--only", "moe,engin"])
    assert exc.value.code == 2 and "unknown part(s) ['engin']" in capsys.readouterr().err


def test_flop_and_parameter_arithmetic():
    sys.path.insert(0, REPO)
    from bench.gpu import bench_2b_config, moe_layer_flops, mfu_params

    c = bench_2b_config()
    # the baseline: 10,950 tokens/s was 6.8% of 795 TFLOP/s with 6 x active non-embedding params
    n = mfu_params(c)
    assert abs(6 * n * 10950 / 795e12 - 0.068) < 0.001
    # per token: router 32 x 2048, 8 routed + 1 shared experts of 3 x 2048 x 512; x2 (mul-add) x3 (fwd+bwd)
    assert moe_layer_flops(c, 1) == 3 * 2 * (32 * 2048 + 9 * 3 * 2048 * 512)
