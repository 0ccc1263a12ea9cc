"""The OpenAI-compatible chat surface and the token-recording agent, on the tiny policy."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from kpop.policy.checkpoint import build_model
from kpop.policy.presets import tiny_config
from kpop.policy.tokenizer import get_tokenizer
from kpop.rollout.chat import ChatClient, ChatSession
from kpop.rollout.embedded import EmbeddedEngine
from kpop.rollout.engine import GenerationResult


@pytest.fixture(scope="module")
def setup():
    tok = get_tokenizer()
    model = build_model(tiny_config(vocab_size=len(tok), eos_token_id=tok.eos_token_id), seed=1).eval()
    engine = EmbeddedEngine(model, tok, max_seqs=8)
    yield model, tok, ChatClient(engine, tok)
    engine.close()


def score(model, ids: list[int]) -> torch.Tensor:
    """Learner-side logprob of every token given its prefix (position 0 gets 0)."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    return torch.cat([torch.zeros(1), lp[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)])


MESSAGES = [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "What is 2 + 3?"}]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "a + b", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}]


def test_create_has_openai_shape_and_training_tokens(setup):
    model, tok, client = setup
    c = client.create(MESSAGES, TOOLS, temperature=0.8, max_tokens=16, seed=1, logprobs=True, n=2)
    assert c.object == "chat.completion" and len(c.choices) == 2
    assert c.prompt_token_ids == tok.apply_chat_template(MESSAGES, tools=TOOLS, add_generation_prompt=True)["input_ids"]
    for ch in c.choices:
        assert ch.message["role"] == "assistant" and isinstance(ch.message["content"], str)
        assert ch.finish_reason in ("stop", "length", "tool_calls")
        assert len(ch.token_ids) == len(ch.token_logprobs) == len(ch.logprobs.content) <= 16
        assert [t.logprob for t in ch.logprobs.content] == ch.token_logprobs
        assert all(v == 0 for v in ch.token_versions)
    assert c.usage.completion_tokens == sum(len(ch.token_ids) for ch in c.choices)
    assert c.choices[0].token_ids != c.choices[1].token_ids  # n samples use seeds 1 and 2
    json.dumps(c.model_dump())  # serialisable as an HTTP response would be


def test_tool_calls_are_parsed_into_openai_form(setup):
    _, tok, client = setup
    text = 'Let me add.<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    result = GenerationResult(request_id="r", prompt_token_ids=[1], token_ids=ids, logprobs=[-0.1] * len(ids),
                              token_versions=[4] * len(ids), finish_reason="stop", stop_reason=ids[-1])
    ch = client._completion([1], [result], want_logprobs=False).choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message["content"] == "Let me add."
    call = ch.message["tool_calls"][0]
    assert call["function"]["name"] == "add" and json.loads(call["function"]["arguments"]) == {"a": 2, "b": 3}
    bad = tok('<tool_call>{"name": 3}</tool_call><|im_end|>', add_special_tokens=False)["input_ids"]
    result = result.model_copy(update={"token_ids": bad, "logprobs": [0.0] * len(bad), "token_versions": [4] * len(bad)})
    ch = client._completion([1], [result], want_logprobs=False).choices[0]
    assert ch.finish_reason == "stop" and "name" in ch.tool_call_errors[0]


def test_bad_arguments_are_named(setup):
    _, _, client = setup
    with pytest.raises(TypeError, match="frequency_penalty"):
        client.create(MESSAGES, frequency_penalty=1.0)
    with pytest.raises(ValueError, match="non-empty list"):
        client.create([])
    with pytest.raises(ValueError, match="temperature"):
        client.create(MESSAGES, temperature=-1)


def test_session_trace_extends_exact_model_tokens_and_matches_learner(setup):
    """Two turns with a tool result in between: the trace is turn-1 prompt + the model's exact
    tokens + the new messages' tokens + turn-2 tokens; the learner's full forward over the trace
    reproduces every rollout logprob (fp32, CPU)."""
    model, tok, client = setup
    session = ChatSession(client, temperature=1.0, max_tokens=12, seed=5)

    async def run():
        first = await session(list(MESSAGES), TOOLS)
        msgs = [*MESSAGES, first, {"role": "user", "content": "Use the add tool, please."}]
        await session(msgs, TOOLS)
        return msgs

    msgs = asyncio.run(run())
    tr = session.trace
    c1, c2 = session.completions
    assert session.restarts == 0
    assert tr.token_ids[: len(c1.prompt_token_ids)] == c1.prompt_token_ids
    n1 = len(c1.prompt_token_ids) + len(c1.choices[0].token_ids)
    assert tr.token_ids[len(c1.prompt_token_ids): n1] == c1.choices[0].token_ids  # exact, not re-tokenised
    assert c2.prompt_token_ids == tr.token_ids[: len(c2.prompt_token_ids)]
    delta_text = tok.decode(c2.prompt_token_ids[n1:], skip_special_tokens=False)
    assert delta_text.endswith("<|im_start|>user\nUse the add tool, please.<|im_end|>\n<|im_start|>assistant\n")
    assert sum(tr.loss_mask) == len(c1.choices[0].token_ids) + len(c2.choices[0].token_ids)
    assert [s[2] for s in tr.segments()] == [0, 0] and len(tr.segments()) == 2
    mask = torch.tensor(tr.loss_mask, dtype=torch.bool)
    delta = (score(model, tr.token_ids)[mask] - torch.tensor(tr.logprobs)[mask]).abs().max().item()
    assert delta < 1e-4, delta
    # an env that rewrites history restarts the trace instead of producing a wrong token stream
    asyncio.run(session([{"role": "user", "content": "new"}], None))
    assert session.restarts == 1 and tr is not session.trace
