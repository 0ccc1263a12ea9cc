"""Cold-start SFT data: oracle demonstrations from the environments.

A demonstration is tokenised the way a rollout worker's `ChatSession` tokenises an episode
(prompt text encoded as one piece, each assistant turn encoded up to and including the eos
token), so what SFT teaches is exactly what the policy will later be asked to produce.
"""

from __future__ import annotations

import asyncio
from typing import Any

import environments
from environments.core import oracle_agent
from environments.runner import run_episode
from kpop.config import EnvSpec


def demo_tokens(tokenizer: Any, messages: list[dict], tools: list[dict] | None) -> tuple[list[int], list[int]]:
    """(token_ids, loss_mask) of a whole conversation; mask 1 on assistant-generated tokens."""

    def render(msgs: list[dict], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tools=tools or None, tokenize=False, add_generation_prompt=gen)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = tokenizer.eos_token
    ids: list[int] = []
    mask: list[int] = []
    consumed = ""
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        turn = render(messages[: i + 1], False)
        end = turn.rfind(eos) + len(eos)
        if not (prompt.startswith(consumed) and turn.startswith(prompt) and end > len(prompt)):
            raise ValueError("chat template is not prefix-stable: cannot tokenise the demonstration incrementally")
        piece = encode(prompt[len(consumed):])
        ids += piece
        mask += [0] * len(piece)
        piece = encode(turn[len(prompt):end])
        ids += piece
        mask += [1] * len(piece)
        consumed = turn[:end]
    return ids, mask


async def _oracle_episodes(spec: EnvSpec, seeds: list[int], step_timeout_s: float) -> list:
    env = environments.make(spec.id, **spec.kwargs)
    try:
        return [await run_episode(env, oracle_agent(env), seed=s, step_timeout_s=step_timeout_s) for s in seeds]
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
        for ep in asyncio.run(_oracle_episodes(spec, seeds, step_timeout_s)):
            if ep.status == "ok" and ep.reward > 0.0:
                out.append(demo_tokens(tokenizer, ep.messages, ep.tools))
    if not out:
        raise RuntimeError(f"no oracle demonstration earned any reward in {[e.id for e in envs]}")
    return out
