"""Cold-start SFT demonstrations come out of the rollout's episode loop: the oracle's turns are
the tokens the policy would have to write after the prompts the rollout builds."""

from __future__ import annotations

import pytest

from kpop.config import EnvSpec
from kpop.policy.tokenizer import get_tokenizer
from kpop.sft import collect_demos, oracle_episodes

SPECS = [EnvSpec(id="kpop/tooluse-v0", kwargs={"difficulty": 1}), EnvSpec(id="kpop/workflow-v0", weight=2.0)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_demonstration_is_the_rollout_token_stream_of_the_oracle(spec):
    import asyncio

    tok = get_tokenizer()
    [traj] = asyncio.run(oracle_episodes(spec, [3], tok))
    assert traj.status == "ok" and traj.reward == 1.0
    text = tok.apply_chat_template(traj.messages, tools=_tools(spec), tokenize=False)
    eos = tok.eos_token
    # the whole stream is the chat rendering of the conversation, up to the last end of turn
    assert tok.decode(traj.token_ids, skip_special_tokens=False) == text[: text.rfind(eos) + len(eos)]
    # each model-token run is one assistant turn as the template renders it, ending the turn
    turns = [m for m in traj.messages if m["role"] == "assistant"]
    assert len(traj.segments) == len(turns) >= 1
    for seg, msg in zip(traj.segments, turns):
        assert all(traj.loss_mask[seg.start:seg.end])
        piece = tok.decode(traj.token_ids[seg.start:seg.end], skip_special_tokens=False)
        assert piece.endswith(eos) and (msg.get("content") or "") in piece
    assert sum(traj.loss_mask) == sum(s.end - s.start for s in traj.segments)


def _tools(spec: EnvSpec):
    from environments import make

    env = make(spec.id, **spec.kwargs)
    try:
        return env.reset(seed=3)[1]["tools"] or None
    finally:
        env.close()


def test_collect_demos_spreads_by_weight_and_keeps_only_full_reward():
    tok = get_tokenizer()
    demos = collect_demos(SPECS, 6, tok, seed=1)
    assert len(demos) == 6  # 2 tooluse + 4 workflow, all solved by the oracle
    for ids, mask in demos:
        assert len(ids) == len(mask) and 0 < sum(mask) < len(ids) and mask[0] == 0
    with pytest.raises(RuntimeError, match="no oracle demonstration"):
        collect_demos([EnvSpec(id="test/never-solved-v0")], 2, tok)


@pytest.fixture(autouse=True, scope="module")
def _never_solved():
    """An env whose oracle cannot earn reward 1."""
    from environments import ChatEnv, Task, Toolbox, assistant, register

    class NeverSolved(ChatEnv):
        def _new_task(self, rng, options):
            return Task(task_id="never/0", prompt="hi")

        def _toolbox(self, task):
            return Toolbox([])

        def _verify(self, final):
            return 0.0, {}

        def oracle_action(self, messages):
            return assistant("no")

    register("test/never-solved-v0", NeverSolved)
