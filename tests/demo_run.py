"""Test fixture: a small real run directory for the viewer, replay and export tests.

    write_demo_run(tmp / "demo")    # archive of real episodes + metrics.jsonl + a tokenizer

Episodes are played in the real environments, through the rollout's episode loop
(`play_episode`), by the env's oracle (reward 1) and by a wrong agent (one random action from
the env's action space, then a wrong answer) as teachers. Token streams are the rollout's own
tokenisation of each conversation; the rollout / learner logprobs are *synthetic* (no model
plays these episodes), drawn from a seeded generator so that the KPop mask and the
logprob-mismatch colouring have something to show. The tokenizer is saved to `policy/`, where a
run saves its final policy and tokenizer. Metrics use the keys the learner logs.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any, Literal

from environments import make, oracle_agent
from environments.core import ChatEnv, Message
from kpop.rollout.chat import ChatClient
from kpop.rollout.worker import RolloutTask, play_episode
from kpop.trajectory import Segment, Trajectory

AgentKind = Literal["oracle", "wrong"]


def wrong_agent(env: ChatEnv):
    """A tool call with bad arguments (answered with a tool error), a random action from the
    env's seeded action space, then a wrong final answer."""

    async def agent(messages: list[Message], tools: list[dict[str, Any]]) -> Message:
        turn = sum(m["role"] == "assistant" for m in messages)
        if turn == 0 and tools:
            name = (tools[0].get("function") or tools[0]).get("name", "")
            return {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_bad", "type": "function", "function": {"name": name, "arguments": '{"bogus": 1}'}}]}
        if turn == 1:
            action = env.action_space.sample()
            if action.get("tool_calls"):
                return action
        return {"role": "assistant", "content": "I am not sure; my answer is -12345."}

    return agent


def play(env_id: str, agent: AgentKind, seed: int, run_id: str = "demo", env_kwargs: dict[str, Any] | None = None,
         max_turns: int | None = None, tokenizer: Any = None) -> Trajectory:
    """One real episode, played through the rollout's episode loop with `agent` as the teacher:
    its tokens are what the policy would have had to write (logprob 0, version 0)."""
    from kpop.policy.tokenizer import get_tokenizer

    task = RolloutTask(env_id=env_id, seed=seed, group_id=f"{env_id}#{seed}", env_kwargs=env_kwargs or {})
    client = ChatClient(None, tokenizer or get_tokenizer())
    env = make(env_id, **(env_kwargs or {}))
    try:
        teacher = oracle_agent(env) if agent == "oracle" else wrong_agent(env)
        return asyncio.run(play_episode(client, env, task, run_id=run_id, max_turns=max_turns, teacher=teacher))
    finally:
        env.close()


def synthetic_logprobs(traj: Trajectory, versions: list[int], rng: random.Random) -> tuple[Trajectory, list[float]]:
    """`traj` with drawn rollout logprobs on its model tokens and assistant turn k tagged policy
    version `versions[k % len(versions)]`. Returns (trajectory, synthetic learner logprobs)."""
    segments = [Segment(s.start, s.end, versions[k % len(versions)]) for k, s in enumerate(_turns(traj.loss_mask))]
    rollout = [-abs(rng.gauss(0.0, 1.0)) if m else 0.0 for m in traj.loss_mask]
    # the learner mostly agrees; a few tokens disagree a lot (what KPop masks out)
    train = [lp + (rng.choice([-2.5, 2.0]) if rng.random() < 0.08 else rng.gauss(0.0, 0.02)) if m else 0.0
             for lp, m in zip(rollout, traj.loss_mask)]
    train = [min(t, 0.0) for t in train]
    return traj.model_copy(update={"logprobs": rollout, "segments": segments}), train


def _turns(mask: list[int]) -> list[Segment]:
    """Runs of model tokens (one per assistant turn)."""
    out: list[Segment] = []
    for i, m in enumerate(mask):
        if m and out and out[-1].end == i:
            out[-1] = Segment(out[-1].start, i + 1, 0)
        elif m:
            out.append(Segment(i, i + 1, 0))
    return out


def write_demo_run(run_dir: str | Path, env_ids: tuple[str, ...] = ("kpop/tooluse-v0", "kpop/workflow-v0"),
                   seeds: tuple[int, ...] = (0, 1), steps: int = 6, seed: int = 0) -> Path:
    """Archive oracle + wrong-agent episodes of `env_ids` and write a metrics.jsonl of `steps` steps."""
    from kpop.archive import TrajectoryArchive
    from kpop.policy.tokenizer import get_tokenizer

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tok = get_tokenizer()
    tok.save_pretrained(str(run_dir / "policy"))  # where a run keeps its final policy's tokenizer
    rng = random.Random(seed)
    with TrajectoryArchive(run_dir) as archive:
        n = 0
        for env_id in env_ids:
            for s in seeds:
                for agent in ("oracle", "wrong"):
                    traj = play(env_id, agent, s, run_id=run_dir.name, tokenizer=tok)  # type: ignore[arg-type]
                    step = n % steps
                    traj, train = synthetic_logprobs(traj, versions=[step, step + 1], rng=rng)
                    status = "failed" if traj.status == "failed" else ("dropped_stale" if n % 5 == 4 else "consumed")
                    archive.write([traj], status=status, step=step, policy_version=step + 2, train_logprobs=[train])
                    n += 1
    with (run_dir / "metrics.jsonl").open("w") as f:
        for step in range(steps):
            f.write(json.dumps({"phase": "rl", "step": step, "time": 1.7e9 + step,
                                "reward_mean": round(0.3 + 0.1 * step + rng.uniform(-0.05, 0.05), 4),
                                "staleness_mean": round(rng.uniform(0.0, 2.0), 3),
                                "mask_rate": round(0.05 + rng.uniform(0.0, 0.05), 4)}) + "\n")
            if step % 3 == 2:
                f.write(json.dumps({"phase": "eval", "step": step, "time": 1.7e9 + step,
                                    "eval_reward": round(0.25 + 0.1 * step, 3)}) + "\n")
    return run_dir
