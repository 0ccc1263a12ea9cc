"""Cold-start SFT data: oracle demonstrations from the environments.

A demonstration is an episode played by `kpop.rollout.worker.play_episode` with the env's oracle as
the teacher: its turns are tokenised by the rollout's own prompt building (`ChatSession`), as
the tokens the policy would have to write, so what SFT teaches is exactly what the policy will
later be asked to produce.
"""

from __future__ import annotations

import asyncio
from typing import Any

import environments
from environments.core import oracle_agent
from kpop.config import EnvSpec
from kpop.rollout.chat import ChatClient
from kpop.rollout.worker import RolloutTask, play_episode
from kpop.trajectory import Trajectory


async def oracle_episodes(spec: EnvSpec, seeds: list[int], tokenizer: Any, step_timeout_s: float = 60.0,
                          run_id: str = "sft") -> list[Trajectory]:
    """The env's oracle played on `seeds`, one env reset per seed, as trajectories with tokens."""
    client = ChatClient(None, tokenizer)
    env = environments.make(spec.id, **spec.kwargs)
    try:
        return [await play_episode(client, env, RolloutTask(env_id=spec.id, seed=s, group_id=run_id,
                                                            env_kwargs=spec.kwargs),
                                   run_id=run_id, step_timeout_s=step_timeout_s, teacher=oracle_agent(env))
                for s in seeds]
    finally:
        env.close()


def collect_demos(
    envs: list[EnvSpec], n: int, tokenizer: Any, seed: int = 0, step_timeout_s: float = 60.0
) -> list[tuple[list[int], list[int]]]:
    """`n` oracle demonstrations spread over `envs` by weight; only episodes that earned some reward
    (an oracle may be a mixed-quality demonstrator on purpose; one that earned nothing teaches nothing)."""
    total = sum(e.weight for e in envs)
    out: list[tuple[list[int], list[int]]] = []
    for k, spec in enumerate(envs):
        count = max(1, round(n * spec.weight / total))
        seeds = [seed * 1_000_003 + k * 100_003 + i for i in range(count)]
        for traj in asyncio.run(oracle_episodes(spec, seeds, tokenizer, step_timeout_s)):
            if traj.status == "ok" and traj.reward > 0.0:
                out.append((traj.token_ids, traj.loss_mask))
    if not out:
        raise RuntimeError(f"no oracle demonstration earned any reward in {[e.id for e in envs]}")
    return out
