"""Local BPE tokenizer and chat format (kpop/policy/tokenizer.py, kpop/policy/chat.py)."""

from __future__ import annotations

import json

import pytest

from kpop.policy.chat import SPECIAL_TOKENS, parse_assistant
from kpop.policy.tokenizer import get_tokenizer, load_tokenizer, train_tokenizer, training_corpus

TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two ints.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]
CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is 2+3? Use the tool."},
    {"role": "assistant", "content": "Let me add.", "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
    {"role": "tool", "tool_call_id": "call_0", "content": "5"},
    {"role": "assistant", "content": "2+3 = 5."},
]
EXPECTED = (
    "<|im_start|>system\nYou are a careful assistant.\n\n# Tools\n<tools>\n"
    + json.dumps(TOOLS[0]) + "\n</tools><|im_end|>\n"
    "<|im_start|>user\nWhat is 2+3? Use the tool.<|im_end|>\n"
    "<|im_start|>assistant\nLet me add.<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 2, \"b\": 3}}\n</tool_call><|im_end|>\n"
    "<|im_start|>tool\n<tool_response>\n5\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n2+3 = 5.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def test_training_is_deterministic_and_cached(tmp_path, monkeypatch):
    corpus = training_corpus()[:60]
    a, b = train_tokenizer(300, corpus), train_tokenizer(300, corpus)
    assert a.to_str() == b.to_str() and a.get_vocab_size() == 300
    monkeypatch.setenv("KPOP_CACHE", str(tmp_path))
    first = get_tokenizer(320)
    cached = list(tmp_path.glob("tokenizer/bpe320-*/tokenizer.json"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    again = get_tokenizer(320)
    assert cached[0].stat().st_mtime_ns == mtime  # loaded, not retrained
    assert first.get_vocab() == again.get_vocab() and len(first) == 320
    with pytest.raises(ValueError, match="vocab_size must exceed"):
        train_tokenizer(200, corpus)


def test_encode_decode_round_trip(tok):
    assert len(tok) == 1024
    text = "def f(x):\n    return x ** 2  # ünïcödé, 日本語, emoji 🙂\n\ttabs and  spaces"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert max(ids) < len(tok)
    for i, special in enumerate(SPECIAL_TOKENS):  # each special token is one id, in order
        assert tok.convert_tokens_to_ids(special) == i
        ids = tok.encode(f"x {special} y", add_special_tokens=False)
        assert ids.count(i) == 1 and tok.decode(ids) == f"x {special} y"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 0


def test_chat_template_renders_tools_calls_and_results(tok, tmp_path):
    text = tok.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert text == EXPECTED
    ids = tok.apply_chat_template(CONVERSATION, tools=TOOLS, add_generation_prompt=True, return_dict=False)
    assert tok.decode(ids) == EXPECTED
    # without tools or system message there is no system block; dict arguments render as JSON too
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "ping", "arguments": {"host": "x"}}}]}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        "<tool_call>\n{\"name\": \"ping\", \"arguments\": {\"host\": \"x\"}}\n</tool_call><|im_end|>\n")
    # the saved directory is a standard HF tokenizer with the template inside
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    for loaded in (load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert loaded.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=True) == EXPECTED


def test_render_then_parse_round_trip(tok):
    msg = {"role": "assistant", "reasoning_content": "2 and 3 are ints.", "content": "Adding now.", "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}},
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 5, "b": 1}'}}]}
    rendered = tok.apply_chat_template([{"role": "user", "content": "q"}, msg], tokenize=False)
    turn_text = rendered.split("<|im_start|>assistant\n", 1)[1]
    generated = tok.decode(tok.encode(turn_text, add_special_tokens=False))  # what sampling would give
    turn = parse_assistant(generated)
    assert turn.errors == []
    assert turn.to_message() == msg


def test_parse_plain_text_and_end_tokens():
    turn = parse_assistant("Just an answer.<|im_end|>garbage after eos")
    assert turn.content == "Just an answer." and turn.tool_calls == [] and turn.errors == []
    assert turn.to_message() == {"role": "assistant", "content": "Just an answer."}


@pytest.mark.parametrize(
    "body, error",
    [
        ('{"name": "add", "arguments": {"a": 1,}}', "not valid JSON"),
        ('{"arguments": {"a": 1}}', "needs a string 'name'"),
        ('{"name": "add", "arguments": [1, 2]}', "'arguments' must be a JSON object, got list"),
        ('["add"]', "needs a string 'name'"),
    ],
)
def test_malformed_tool_calls_are_reported_not_raised(body, error):
    good = '<tool_call>\n{"name": "ok", "arguments": {"x": 1}}\n</tool_call>'
    turn = parse_assistant(f"Trying.{good}<tool_call>\n{body}\n</tool_call>{good}")
    assert len(turn.errors) == 1 and error in turn.errors[0]
    assert [c.function.name for c in turn.tool_calls] == ["ok", "ok"]
    assert [c.id for c in turn.tool_calls] == ["call_0", "call_1"]
    assert turn.content == "Trying."


def test_unclosed_and_stray_tags():
    turn = parse_assistant('Hi <tool_call>{"name": "add", "arguments": {}}')
    assert turn.tool_calls == [] and "unclosed <tool_call>" in turn.errors[0] and turn.content == "Hi"
    turn = parse_assistant("oops </tool_call> done")
    assert turn.errors == ["</tool_call> without a matching <tool_call>"] and turn.content == "oops  done"
    turn = parse_assistant('<tool_call>{"name": "f", "arguments": "{\\"k\\": 2}"}</tool_call>')
    assert turn.errors == [] and json.loads(turn.tool_calls[0].function.arguments) == {"k": 2}
