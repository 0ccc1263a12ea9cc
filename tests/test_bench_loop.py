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
    # progress as it happened, on stderr: every phase, each learner step and its split
    progress = run.stderr
    for line in ("building the loop", "kpop.train: learner ready on cpu", "rollout worker w0 ready",
                 "learner step 1: starts on 8 trajectories", "learner step 3: learned in", "step 3: ",
                 "checkpoint skipped", "done: 2 timed steps"):
        assert line in progress, line
    assert out["loop_build_s"] > 0 and out["loop_warmup_s"] > 0


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


def test_heartbeat_repeats_the_phase_and_the_counters():
    """A run cut off by a time limit must have said where it was: the heartbeat repeats the phase."""
    import io
    import time

    sys.path.insert(0, REPO)
    from bench.loop import Reporter

    out = io.StringIO()
    with Reporter(every_s=0.01, stream=out) as rep:
        rep.enter("building the loop")
        deadline = time.monotonic() + 30
        while "... still: building the loop" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[loop ") and lines[0].endswith("s] building the loop")
    assert any(line.endswith("... still: building the loop") for line in lines[1:])
