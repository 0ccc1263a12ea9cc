"""bench/vs_trl.py's own pieces, without TRL: the task, TRL's reward = the env's verifier, the adapter."""

from __future__ import annotations

import importlib.metadata
import os
import sys

import pytest
import torch

from bench import vs_trl
from environments.registry import make


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    saved = os.environ.get("PYTHONPATH")
    vs_trl.register_env(root)
    yield root
    sys.path.remove(str(root))
    if saved is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = saved


@pytest.fixture(scope="module")
def tok():
    from kpop.policy.tokenizer import get_tokenizer

    return get_tokenizer()


def _render(tok, msg):
    """Token ids of an assistant turn as the policy would sample it (the chat template's rendering)."""
    user = [{"role": "user", "content": "x"}]
    prompt = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template([*user, msg], tokenize=False)
    assert full.startswith(prompt)
    return tok.encode(full[len(prompt):], add_special_tokens=False)


def test_the_task_is_one_turn_and_its_oracle_earns_full_reward(registered):
    env = make(vs_trl.ENV_ID, split="train")
    for seed in range(20):
        env.reset(seed=seed)
        _, reward, terminated, truncated, info = env.step(env.oracle_action(env.transcript))
        assert terminated and not truncated and reward == 1.0, info


def test_sft_takes_its_oracle_episodes_as_demonstrations(registered, tok):
    from kpop.config import EnvSpec
    from kpop.sft import collect_demos

    demos = collect_demos([EnvSpec(id=vs_trl.ENV_ID, kwargs={"split": "train"})], 8, tok)
    assert len(demos) == 8 and all(sum(mask) > 0 for _, mask in demos)


def test_workers_find_the_task_by_its_entry_point(registered):
    eps = [ep for ep in importlib.metadata.entry_points(group="kpop.environments") if ep.name == vs_trl.ENV_ID]
    assert [ep.value for ep in eps] == [vs_trl.ENTRY_POINT]
    assert str(registered) in os.environ["PYTHONPATH"].split(os.pathsep)


def test_trl_reward_is_the_env_verifier(registered, tok):
    """The reward TRL gets for sampled token ids is what the env gives the same message, for a
    right call, a wrong call, a final answer without a call and unparsable text."""
    env = make(vs_trl.ENV_ID, split="train")
    seeds, ids, expected = [], [], []
    for seed in range(6):
        env.reset(seed=seed)
        oracle = env.oracle_action(env.transcript)
        wrong = {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "1+1000"}'}}]}
        for msg in (oracle, wrong, {"role": "assistant", "content": "42"}):
            env.reset(seed=seed)
            expected.append(env.step(msg)[1])
            seeds.append(seed)
            ids.append(_render(tok, msg))
    seeds.append(0)
    ids.append(tok.encode("<tool_call>\n{\"name\": \"calcul"))  # cut off mid-call, no end-of-turn
    expected.append(0.0)
    got = vs_trl.verifier_rewards(tok, ids, seeds)
    assert got == expected
    assert set(got) == {1.0, 0.2, 0.0}


def test_adapter_packs_padded_rows_like_separate_forwards():
    """TRL pads prompts left and completions right; the adapter must give each row exactly the
    hidden states and logits of that row run alone, unpadded."""
    from kpop.policy.checkpoint import build_model
    from kpop.policy.presets import tiny_config

    plain = build_model(tiny_config(vocab_size=64), seed=0).eval()
    adapter = vs_trl.make_adapter_class()(plain.config).eval()
    adapter.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 64, (n,), generator=g) for n in (5, 9, 7)]
    T, pad = 12, 0
    ids = torch.full((3, T), pad)
    mask = torch.zeros(3, T, dtype=torch.long)
    lefts = (2, 0, 3)  # left padding, then right padding after the row
    for i, (r, left) in enumerate(zip(rows, lefts)):
        ids[i, left:left + len(r)] = r
        mask[i, left:left + len(r)] = 1
    with torch.no_grad():
        out = adapter(ids, attention_mask=mask)
        hidden = adapter.base_model(ids, attention_mask=mask, use_cache=False).last_hidden_state
        for i, (r, left) in enumerate(zip(rows, lefts)):
            alone = plain(r[None])
            torch.testing.assert_close(out.logits[i, left:left + len(r)], alone.logits[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(hidden[i, left:left + len(r)], alone.hidden_states[0], rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="padding masks are not supported"):
            plain(ids, attention_mask=mask)  # why the adapter exists


def test_mean_se():
    assert vs_trl.mean_se([1.0]) == (1.0, 0.0)
    m, se = vs_trl.mean_se([0.0, 1.0, 0.0, 1.0])
    assert m == 0.5 and se == pytest.approx(0.2887, abs=1e-4)
