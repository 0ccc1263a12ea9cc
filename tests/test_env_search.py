"""Search family: BM25 over CPython's documentation topics; EM/F1 grading; cached index."""

from __future__ import annotations

import asyncio

import pytest

from environments import assistant, make, oracle_agent, run_episode
from environments.grading import exact_match, f1_score, normalize_answer
from environments.search import Corpus, make_question


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make("kpop/search-v0", cache_dir=str(tmp_path_factory.mktemp("search-cache")))


def play(env, agent, seed):
    return asyncio.run(run_episode(env, agent, seed=seed))


def test_oracle_scores_one(env):
    kinds = set()
    for seed in range(20):
        ep = play(env, oracle_agent(env), seed)
        assert ep.status == "ok" and ep.reward == 1.0, (ep.task_id, ep.reward_detail)
        assert [m.get("name") for m in ep.messages if m["role"] == "tool"] == ["search", "read"]
        kinds.add(ep.reward_detail["kind"])
    assert kinds == {"cloze", "title"}


def test_wrong_and_partial_answers_score_less(env):
    for seed in range(50):
        env.reset(seed=seed)
        if env.task.data["kind"] == "title" and len(env.task.data["answer"].split()) >= 2:
            break
    gold = env.task.data["answer"]

    def answering(text):
        async def agent(messages, tools):
            return assistant(text)
        return agent

    assert play(env, answering("zebra"), seed).reward == 0.0
    partial = play(env, answering(gold.split()[-1]), seed)
    assert 0.0 < partial.reward < 1.0 and partial.reward_detail["em"] == 0.0
    assert play(env, answering(f"The answer is: {gold}"), seed).reward < 1.0


def test_grading_normalisation():
    assert normalize_answer('The "assert" statement!') == "assert statement"
    assert exact_match("__init__", "__init__") == 1.0
    assert f1_score("the big cat", "big dog") == pytest.approx(0.5)


def test_search_tool_finds_the_right_topic(env):
    env.reset(seed=0)
    args = '{"query": "assert statement AssertionError __debug__"}'
    call = {"id": "c", "type": "function", "function": {"name": "search", "arguments": args}}
    hits = env.tools.call(call)["content"]
    assert '"id": "assert#' in hits
    call["function"]["arguments"] = '{"query": "x", "k": 99}'
    assert env.tools.call(call)["content"] == "error: k must be between 1 and 10, got 99"


def test_index_is_cached(tmp_path):
    first = Corpus(tmp_path)
    cached = [p for p in tmp_path.iterdir() if p.name.startswith("bm25-")]
    assert len(cached) == 1 and (cached[0] / "params.index.json").exists()
    again = Corpus(tmp_path)
    assert [p.id for p in again.search("lambda expressions anonymous functions")] == \
           [p.id for p in first.search("lambda expressions anonymous functions")]
    assert len(first.passages) > 500  # the whole documentation, not a sample


def test_questions_are_seeded(env):
    assert make_question(env.corpus, 42) == make_question(env.corpus, 42)
    assert make_question(env.corpus, 42) != make_question(env.corpus, 43)
