"""Workflow family: graded by comparing the final database state with the oracle's."""

from __future__ import annotations

import asyncio

from environments import assistant, make, oracle_agent, run_episode
from environments.workflow import build_database
from environments.workflow.env import dump


def play(env, agent, seed):
    return asyncio.run(run_episode(env, agent, seed=seed))


def scripted(calls, final="done"):
    async def agent(messages, tools):
        turn = sum(m["role"] == "assistant" for m in messages)
        return assistant(None, calls[turn]) if turn < len(calls) else assistant(final)

    return agent


def test_oracle_scores_one_and_covers_both_outcomes():
    env = make("kpop/workflow-v0")
    outcomes = set()
    for seed in range(16):
        ep = play(env, oracle_agent(env), seed)
        assert ep.status == "ok" and ep.reward == 1.0, ep.reward_detail
        outcomes.add(env.task.data["plan"][-1][1]["outcome"])
        assert ep.turns == len(env.task.data["plan"]) + 1
    assert outcomes == {"resolved", "denied"}


def test_policy_violation_and_omissions_score_zero():
    env = make("kpop/workflow-v0")
    for seed in range(50):  # a task the policy denies
        env.reset(seed=seed)
        if env.task.data["plan"][-1][1]["outcome"] == "denied":
            break
    t = env.task.data
    act = {"cancellation": ("cancel_order", {"order_id": t["order"]}),
           "refund": ("refund_order", {"order_id": t["order"]}),
           "address_change": ("update_address", {"order_id": t["order"], "address": t["new_address"]})}[t["kind"]]
    violate = play(env, scripted([act, ("close_ticket", {"ticket_id": t["ticket"], "outcome": "resolved"})]), seed)
    assert violate.reward == 0.0 and violate.reward_detail["n_diff"] >= 1
    assert any(d.startswith("tickets/") for d in violate.reward_detail["diff"])
    left_open = play(env, scripted([("get_ticket", {"ticket_id": t["ticket"]})]), seed)
    assert left_open.reward == 0.0 and left_open.reward_detail["diff"][0].startswith(f"tickets/{t['ticket']}")
    wrong_ticket = "T01" if t["ticket"] != "T01" else "T02"
    other = play(env, scripted([("close_ticket", {"ticket_id": wrong_ticket, "outcome": "denied"}),
                                ("close_ticket", {"ticket_id": t["ticket"], "outcome": "denied"})]), seed)
    assert other.reward == 0.0 and other.reward_detail["n_diff"] == 1  # a distractor ticket was touched


def test_database_is_seeded_and_task_ids_replay():
    a, ta = build_database(5)
    b, tb = build_database(5)
    c, _ = build_database(6)
    assert dump(a) == dump(b) and ta == tb and dump(a) != dump(c)
    assert {k: len(v) for k, v in dump(a).items()} == {"customers": 6, "orders": 12, "tickets": 4, "policies": 3}
    env = make("kpop/workflow-v0")
    obs, info = env.reset(seed=9)
    assert env.reset(options={"task_id": info["task_id"]})[0] == obs


def test_tool_errors_do_not_end_the_episode():
    env = make("kpop/workflow-v0")
    env.reset(seed=1)
    out = env.step(assistant(None, ("get_order", {"order_id": "O9999"}),
                             ("close_ticket", {"ticket_id": "T01", "outcome": "maybe"})))
    msgs, reward, terminated, truncated, _ = out
    assert msgs[0]["content"] == "error: no order with id 'O9999'"
    assert msgs[1]["content"].startswith("error: invalid arguments for close_ticket: outcome")
    assert not terminated and not truncated
