"""Tool-use family: the oracle scores 1 at every difficulty, wrong answers score less, partial credit."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading

import pytest

from environments import assistant, make, oracle_agent, run_episode
from environments.tooluse import calculator, convert_units
from environments.tools import MAX_TOOL_OUTPUT_BYTES, ToolError


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


# ---- hostile tool calls: the SQL tool and the calculator face model-chosen input ------------------

def _sql(env, query: str) -> str:
    env.reset(seed=0)
    return env.tools.call({"id": "c", "type": "function",
                           "function": {"name": "sql_query", "arguments": json.dumps({"query": query})}})["content"]


def test_sql_cannot_reach_host_files(tmp_path):
    secret = tmp_path / "secret.db"
    with sqlite3.connect(secret) as host_db:
        host_db.execute("CREATE TABLE keys(k TEXT)")
        host_db.execute("INSERT INTO keys VALUES ('hunter2')")
    host_db.close()
    before = secret.read_bytes()
    env = make("kpop/tooluse-v0", difficulty=2)
    attacks = [
        f"ATTACH DATABASE '{secret}' AS s",  # read a host database
        f"ATTACH DATABASE '{tmp_path / 'new.db'}' AS n",  # ATTACH creates the file if missing
        f"VACUUM INTO '{tmp_path / 'copy.db'}'",  # writes a copy of the facts to a host path
        "SELECT * FROM s.keys",
    ]
    for query in attacks:
        out = _sql(env, query)
        assert out.startswith("error:"), (query, out)
        assert "hunter2" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.db"]  # nothing created
    assert secret.read_bytes() == before
    env.close()


def test_sql_cannot_change_the_facts():
    env = make("kpop/tooluse-v0", difficulty=2)
    for query in ["PRAGMA query_only=OFF", "PRAGMA writable_schema=ON", "DELETE FROM planets",
                  "UPDATE planets SET moons = 0", "INSERT INTO planets VALUES ('Vulcan', 9, 1, 1)",
                  "CREATE TABLE x(y)", "DROP TABLE planets", "CREATE TEMP TABLE x(y)"]:
        assert _sql(env, query).startswith("error:"), query
    # the facts are intact, for this episode and the next
    assert _sql(env, "SELECT count(*), sum(moons) FROM planets") == "[[8, 288]]"
    env.close()


@pytest.mark.parametrize("query", ["SELECT load_extension('/tmp/evil.so')", "SELECT zeroblob(1000000000)",
                                   "SELECT randomblob(1000000000)", "SELECT fts3_tokenizer('simple')",
                                   "SELECT sqlite_compileoption_get(0)"])
def test_sql_functions_outside_the_allow_list_are_refused(query):
    env = make("kpop/tooluse-v0", difficulty=2)
    assert _sql(env, query).startswith("error:")
    assert _sql(env, "SELECT upper(name), round(atomic_weight, 1) FROM elements WHERE atomic_number = 2") \
        == '[["HELIUM", 4.0]]'
    env.close()


ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT count(*) FROM c"


def _in_thread(fn):
    """Run fn in a daemon thread; returns (thread, box) where box[0] gets the result."""
    box: list = []
    t = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    t.start()
    return t, box


def test_endless_query_is_interrupted_with_a_tool_error():
    # Generous liveness bound (the tool's own limit is a few seconds): without interruption the
    # query never ends and the thread would still be running.
    env = make("kpop/tooluse-v0", difficulty=2)
    t, box = _in_thread(lambda: _sql(env, ENDLESS))
    t.join(120)
    assert not t.is_alive(), "the endless query was never interrupted"
    assert box[0].startswith("error:") and "time limit" in box[0]
    assert _sql(env, "SELECT count(*) FROM elements") == "[[20]]"  # the connection still works
    env.close()


def test_close_interrupts_a_running_query():
    env = make("kpop/tooluse-v0", difficulty=2)
    env.reset(seed=0)
    started = threading.Event()
    sql_tool = env.tools["sql_query"]

    def query():
        started.set()
        try:
            return sql_tool.fn(query=ENDLESS)
        except ToolError as exc:
            return f"error: {exc}"

    t, box = _in_thread(query)
    started.wait()
    closer, _ = _in_thread(env.close)
    closer.join(120)
    t.join(120)
    assert not closer.is_alive() and not t.is_alive()
    assert box[0].startswith("error:")


def _call_episode(name: str, arguments: str):
    """One tool call with raw `arguments`, then a final answer; returns (episode, tool message)."""
    env = make("kpop/tooluse-v0", difficulty=2)

    async def agent(messages, tools):
        if messages[-1]["role"] != "tool":
            msg = assistant(None, (name, {}))
            msg["tool_calls"][0]["function"]["arguments"] = arguments
            return msg
        return assistant("42")

    ep = play(env, agent, 0)
    env.close()
    return ep, next(m for m in ep.messages if m["role"] == "tool")


@pytest.mark.parametrize("name, arguments, needle", [
    ("sql_query", '{"query": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested"),
    ("sql_query", '{"query": "SELECT \\ud800"}', "surrogate"),
    ("calculator", '{"expression": "(-8) ** 0.5"}', "not a real number"),
    ("calculator", '{"expression": "999999.0 ** 64"}', "too large"),
    ("calculator", '{"expression": "1e308 * 10"}', "not a finite number"),
    ("convert_units", '{"value": 1e308, "from_unit": "km", "to_unit": "mm"}', "not a finite number"),
])
def test_hostile_arguments_give_tool_errors_not_failed_episodes(name, arguments, needle):
    ep, tool_msg = _call_episode(name, arguments)
    assert ep.status == "ok", ep.error
    assert tool_msg["content"].startswith("error:") and needle in tool_msg["content"], tool_msg["content"]


def test_blobs_from_sqlite_come_back_as_text():
    ep, tool_msg = _call_episode("sql_query", json.dumps({"query": "SELECT x'00ff', 1"}))
    assert ep.status == "ok", ep.error
    assert json.loads(tool_msg["content"]) == [["x'00ff'", 1]]


def test_tool_output_is_capped():
    ep, tool_msg = _call_episode("sql_query", json.dumps({"query": "SELECT printf('%.*c', 900000, 'x')"}))
    assert ep.status == "ok", ep.error
    content = tool_msg["content"]
    assert len(content.encode()) <= MAX_TOOL_OUTPUT_BYTES + 200
    assert "truncated" in content and "900" in content
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
