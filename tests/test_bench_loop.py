"""bench/loop.py on CPU: the colocated loop's benchmark runs end to end on the tiny policy and
reports every key, with the synthetic task at its fixed lengths (no timing is checked)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"loop_trajectories_per_s", "loop_tokens_per_s", "loop_generated_tokens_per_s", "loop_gpu_busy",
        "loop_gpu_busy_method", "loop_gpu_span_share", "loop_staleness_mean", "loop_sync_s_per_step"}


@pytest.mark.slow
def test_cpu_smoke_reports_every_key():
    env = dict(os.environ, PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, "bench/loop.py", "--cpu-smoke", "--json"], cwd=REPO, capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert KEYS <= set(out)
    assert out["loop_device"] == "cpu" and out["loop_gpu_busy_method"] == "host_clock_spans"
    assert out["loop_steps"] == 2
    assert out["loop_trajectories_per_s"] > 0 and out["loop_tokens_per_s"] > out["loop_generated_tokens_per_s"] > 0
    assert 0 < out["loop_gpu_busy"] <= 1 and out["loop_sync_s_per_step"] > 0
    assert 0 <= out["loop_staleness_mean"] <= 1  # max_staleness 1
    assert out["loop_reward_mean"] > 0  # the verifier scored real replies, none was cut


def test_prompt_calibration_gives_the_exact_length():
    sys.path.insert(0, REPO)
    from bench.loop import FixedLengthEnv, prompt_words
    from kpop.policy.tokenizer import get_tokenizer
    from kpop.rollout.chat import ChatClient

    tok = get_tokenizer()
    n = prompt_words(tok, 512)
    client = ChatClient(None, tok)
    for seed in (11, 12):
        messages, _ = FixedLengthEnv(n).reset(seed=seed)
        assert len(client.encode(client.render(messages))) == 512
    env = FixedLengthEnv(n)
    env.reset(seed=3)
    assert env.step(env.oracle_action([]))[1] == 1.0
