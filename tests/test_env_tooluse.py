"""Tool-use family: the oracle scores 1 at every difficulty, wrong answers score less, partial credit."""

from __future__ import annotations

import asyncio

import pytest

from environments import assistant, make, oracle_agent, run_episode
from environments.tooluse import calculator, convert_units


def play(env, agent, seed):
    return asyncio.run(run_episode(env, agent, seed=seed))


@pytest.mark.parametrize("difficulty", [0, 1, 2])
def test_oracle_scores_one(difficulty):
    env = make("kpop/tooluse-v0", difficulty=difficulty)
    for seed in range(12):
        ep = play(env, oracle_agent(env), seed)
        assert ep.status == "ok" and ep.reward == 1.0, ep.reward_detail


def test_easiest_level_is_short():
    env = make("kpop/tooluse-v0", difficulty=0)
    for seed in range(20):
        obs, info = env.reset(seed=seed)
        assert len(obs) == 1 and obs[0]["role"] == "user" and len(obs[0]["content"]) <= 24
        assert [t["function"]["name"] for t in info["tools"]] == ["calculator"]
        gold = env.task.data["answer"]
        assert len(str(gold)) <= 4


def _answer_with(content, call=None):
    """An agent that makes `call` (if any) on its first turn, then answers `content`."""

    async def agent(messages, tools):
        if call and messages[-1]["role"] != "tool":
            return assistant(None, call)
        return assistant(content)

    return agent


def test_partial_credit_components():
    env = make("kpop/tooluse-v0", difficulty=0)
    env.reset(seed=3)
    gold_expr, answer = env.task.data["gold"], env.task.data["answer"]
    both = play(env, _answer_with(str(answer), ("calculator", {"expression": gold_expr})), 3)
    no_tool = play(env, _answer_with(str(answer)), 3)
    wrong = play(env, _answer_with(str(answer + 1), ("calculator", {"expression": gold_expr})), 3)
    nothing = play(env, _answer_with("no idea"), 3)
    wrong_call = play(env, _answer_with("no idea", ("calculator", {"expression": f"{gold_expr}+1"})), 3)
    bad_call = play(env, _answer_with(str(answer + 1), ("calculator", {"expression": "1/0"})), 3)
    assert both.reward == 1.0
    assert no_tool.reward == 0.5 and no_tool.reward_detail["tool"] == 0.0
    assert wrong.reward == 0.5 and wrong.reward_detail["answer"] == 0.0
    assert nothing.reward == 0.0 and bad_call.reward == 0.0
    assert wrong_call.reward == pytest.approx(0.1) and wrong_call.reward_detail["call"] == 1.0  # format credit only
    assert bad_call.messages[2]["content"] == "error: division by zero"


def test_two_step_sql_task_credits_each_required_result():
    env = make("kpop/tooluse-v0", difficulty=2)
    for seed in range(200):  # find a "together" task: two lookups and a sum
        env.reset(seed=seed)
        if len(env.task.data["required"]) == 3:
            break
    q1 = env.task.data["gold"][0]
    ep = play(env, _answer_with(str(env.task.data["answer"]), ("sql_query", {"query": q1})), seed)
    assert ep.reward_detail["tool"] == pytest.approx(1 / 3) and ep.reward == pytest.approx(0.1 + 0.4 / 3 + 0.5)


def test_tools_themselves():
    assert calculator("(12 + 7) * 3") == "57" and calculator("7 / 2") == "3.5" and calculator("2^10") == "1024"
    assert convert_units(5.0, "km", "m") == "5000" and convert_units(100.0, "C", "F") == "212"
    for bad in ("__import__('os')", "2 ** 99999", "x + 1"):
        with pytest.raises(Exception, match="unsupported|too large|cannot parse"):
            calculator(bad)
    with pytest.raises(Exception, match="cannot convert length"):
        convert_units(1.0, "km", "kg")


def test_sql_is_read_only_and_real():
    env = make("kpop/tooluse-v0", difficulty=2)
    env.reset(seed=0)
    call = {"id": "c", "type": "function", "function": {"name": "sql_query", "arguments": ""}}
    call["function"]["arguments"] = '{"query": "DROP TABLE planets"}'
    assert env.tools.call(call)["content"].startswith("error: SQL error")
    call["function"]["arguments"] = '{"query": "SELECT name FROM planets WHERE moons > 50 ORDER BY name"}'
    assert env.tools.call(call)["content"] == '[["Jupiter"], ["Saturn"]]'


def test_train_and_eval_splits_are_disjoint():
    train, held_out = make("kpop/tooluse-v0", split="train"), make("kpop/tooluse-v0", split="eval")
    train_prompts = {train.reset(seed=s)[0][-1]["content"] for s in range(300)}
    eval_prompts = {held_out.reset(seed=s)[0][-1]["content"] for s in range(100)}
    assert len(eval_prompts) > 50 and not train_prompts & eval_prompts
    with pytest.raises(ValueError, match="split must be"):
        make("kpop/tooluse-v0", split="test")


def test_task_ids_replay():
    env = make("kpop/tooluse-v0", difficulty=1)
    obs, info = env.reset(seed=11)
    replay, info2 = make("kpop/tooluse-v0").reset(options={"task_id": info["task_id"]})
    assert replay == obs and info2["task_id"] == info["task_id"]
    with pytest.raises(ValueError, match="bad tooluse task_id"):
        env.reset(options={"task_id": "tooluse/zz"})


def test_mixed_quality_oracle_skips_the_tool_on_a_fixed_share_of_tasks():
    """`oracle_tool_share`: the oracle calls the calculator on that share of tasks (chosen by task
    id, so every env instance agrees) and answers the rest directly and correctly (reward 0.5)."""
    seeds = range(200)

    def tool_use(share):
        env = make("kpop/tooluse-v0", difficulty=0, split="train", oracle_tool_share=share)
        out = {}
        for seed in seeds:
            ep = play(env, oracle_agent(env), seed)
            assert ep.status == "ok" and ep.reward_detail["answer"] == 1.0, ep.reward_detail
            used = any(m.get("tool_calls") for m in ep.messages)
            assert ep.reward == (1.0 if used else 0.5)
            out[ep.task_id] = used
        return out

    always, never, half, half_again = tool_use(1.0), tool_use(0.0), tool_use(0.5), tool_use(0.5)
    assert all(always.values()) and not any(never.values())
    assert half == half_again and 0.4 < sum(half.values()) / len(half) < 0.6
    more = tool_use(0.8)
    assert all(more[t] for t, used in half.items() if used) and sum(more.values()) > sum(half.values())
    with pytest.raises(ValueError, match="oracle_tool_share must be a number in"):
        make("kpop/tooluse-v0", oracle_tool_share=1.5)
    with pytest.raises(ValueError, match="oracle_tool_share must be a number in"):
        make("kpop/tooluse-v0", oracle_tool_share="half")


def test_demonstrations_keep_the_mixed_oracles_direct_answers():
    """Cold-start SFT keeps every demonstration that earned reward, so a mixed-quality oracle's
    direct answers reach the policy (and the tool-calling ones too)."""
    from kpop.config import EnvSpec
    from kpop.policy.tokenizer import get_tokenizer
    from kpop.sft import collect_demos

    tok = get_tokenizer()
    spec = EnvSpec(id="kpop/tooluse-v0", kwargs={"difficulty": 0, "show_tools": False, "oracle_tool_share": 0.5})
    demos = collect_demos([spec], 40, tok)
    texts = [tok.decode([t for t, m in zip(ids, mask) if m]) for ids, mask in demos]
    with_tool = [t for t in texts if "calculator" in t]
    assert len(demos) == 40 and 0 < len(with_tool) < 40
