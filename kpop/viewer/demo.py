"""A small real run directory for trying the viewer, replay and export without training.

    write_demo_run("runs/demo")    # archive of real episodes + metrics.jsonl + a tokenizer

Episodes are played in the real environments by the env's oracle (reward 1) and by a wrong
agent (one random action from the env's action space, then a wrong answer). Token streams are
the real chat-template tokenisation of each conversation; the rollout / learner logprobs are
*synthetic* (no model plays these episodes), drawn from a seeded generator so that the KPop mask
and the logprob-mismatch colouring have something to show. The tokenizer is saved to `policy/`,
where a run saves its final policy and tokenizer. Metrics use the keys the learner logs.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any, Literal

from environments import make, oracle_agent, run_episode
from environments.core import ChatEnv, Message
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
         max_turns: int | None = None) -> Trajectory:
    """One real episode as a `Trajectory` (no tokens)."""
    env = make(env_id, **(env_kwargs or {}))
    try:
        player = oracle_agent(env) if agent == "oracle" else wrong_agent(env)
        ep = asyncio.run(run_episode(env, player, seed=seed, max_turns=max_turns))
    finally:
        env.close()
    return Trajectory(run_id=run_id, task_id=ep.task_id or f"{env_id}#{seed}", env_id=env_id, seed=seed,
                      messages=ep.messages, reward=ep.reward, reward_detail=ep.reward_detail, status=ep.status,
                      error=ep.error, timings=ep.timings)


def tokenize(traj: Trajectory, tokenizer: Any, versions: list[int], rng: random.Random,
             tools: list[dict[str, Any]] | None = None) -> tuple[Trajectory, list[float]]:
    """`traj` with the chat-template tokens of its messages; assistant turn k gets policy version
    `versions[k % len(versions)]`. Returns (trajectory, synthetic learner logprobs)."""
    ids: list[int] = []
    mask: list[int] = []
    segments: list[Segment] = []
    prev = ""
    turn = 0
    for k in range(len(traj.messages)):
        pieces: list[tuple[str, int]] = []
        if traj.messages[k]["role"] == "assistant":
            # the turn header is the prompt's (mask 0); the model writes what follows
            head = tokenizer.apply_chat_template(traj.messages[:k], tools=tools, tokenize=False,
                                                 add_generation_prompt=True)
            pieces.append((head[len(prev):], 0))
            prev = head
        text = tokenizer.apply_chat_template(traj.messages[: k + 1], tools=tools, tokenize=False)
        pieces.append((text[len(prev):] if text.startswith(prev) else text, int(traj.messages[k]["role"] == "assistant")))
        prev = text
        for piece, model in pieces:
            new = tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
            if model and new:
                segments.append(Segment(len(ids), len(ids) + len(new), versions[turn % len(versions)]))
                turn += 1
            mask += [model] * len(new)
            ids += new
    rollout = [-abs(rng.gauss(0.0, 1.0)) if m else 0.0 for m in mask]
    # the learner mostly agrees; a few tokens disagree a lot (what KPop masks out)
    train = [lp + (rng.choice([-2.5, 2.0]) if rng.random() < 0.08 else rng.gauss(0.0, 0.02)) if m else 0.0
             for lp, m in zip(rollout, mask)]
    train = [min(t, 0.0) for t in train]
    out = traj.model_copy(update={"token_ids": ids, "logprobs": rollout, "loss_mask": mask, "segments": segments})
    return Trajectory.model_validate(out.model_dump()), train


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
                    traj = play(env_id, agent, s, run_id=run_dir.name)  # type: ignore[arg-type]
                    step = n % steps
                    traj, train = tokenize(traj, tok, versions=[step, step + 1], rng=rng)
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
