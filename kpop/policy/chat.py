"""The policy's chat format: OpenAI-style messages <-> text, and model output -> tool calls.

Rendered text (ChatML with Hermes-style tool tags)::

    <|im_start|>system
    You are ...

    # Tools
    <tools>
    {"type": "function", "function": {"name": "add", ...}}
    </tools><|im_end|>
    <|im_start|>user
    2+3?<|im_end|>
    <|im_start|>assistant
    <think>...</think>Let me add.<tool_call>
    {"name": "add", "arguments": {"a": 2, "b": 3}}
    </tool_call><|im_end|>
    <|im_start|>tool
    <tool_response>
    5
    </tool_response><|im_end|>
    <|im_start|>assistant

The model's turn ends with `<|im_end|>` (the eos token). `parse_assistant(text)` turns a turn
back into content + OpenAI `tool_calls`; a malformed call becomes an entry in `errors` (the env
can answer it with an error message), never an exception.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, Field

SPECIAL_TOKENS = (
    "<|pad|>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)

# Jinja, rendered by transformers' `apply_chat_template` (its `tojson` filter keeps key order).
CHAT_TEMPLATE = (
    "{% set sys = messages[0].content if messages and messages[0].role == 'system' else none %}"
    "{% if sys is not none or tools %}"
    "<|im_start|>system\n"
    "{% if sys is not none %}{{ sys }}{% endif %}"
    "{% if tools %}"
    "{% if sys is not none %}{{ '\n\n' }}{% endif %}"
    "# Tools\n<tools>\n"
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "</tools>"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'system' and loop.first %}"
    "{% elif m.role == 'tool' %}"
    "<|im_start|>tool\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}"
    "<|im_start|>{{ m.role }}\n"
    "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}"
    "{% if m.content %}{{ m.content }}{% endif %}"
    "{% for tc in (m.tool_calls or []) %}"
    "{% set f = tc.function if tc.function is defined else tc %}"
    "<tool_call>\n{\"name\": {{ f.name | tojson }}, \"arguments\":"
    "{% if f.arguments is string %} {{ f.arguments }}{% else %} {{ f.arguments | tojson }}{% endif %}"
    "}\n</tool_call>"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ToolFunction(BaseModel):
    name: str
    arguments: str  # JSON text, as the OpenAI API carries it


class ToolCall(BaseModel):
    id: str
    type: str = "function"
    function: ToolFunction


class AssistantTurn(BaseModel):
    """One parsed model turn. `errors` lists malformed tool calls (with the offending text)."""

    content: str
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)

    def to_message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning_content is not None:
            msg["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            msg["tool_calls"] = [tc.model_dump() for tc in self.tool_calls]
        return msg


_END_TOKENS = ("<|im_end|>", "<|endoftext|>")
_CALL_RE = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)
_THINK_RE = re.compile(r"^\s*<think>(.*?)</think>", re.DOTALL)


def parse_assistant(text: str, call_id_prefix: str = "call_") -> AssistantTurn:
    """Split a generated assistant turn into reasoning, content and tool calls.

    A call is `<tool_call>{"name": str, "arguments": object}</tool_call>`. Unclosed tags, invalid
    JSON, a missing/non-string name or non-object arguments are reported in `errors`; the
    well-formed calls are still returned, in order.
    """
    for end in _END_TOKENS:
        cut = text.find(end)
        if cut >= 0:
            text = text[:cut]
    reasoning = None
    m = _THINK_RE.match(text)
    if m:
        reasoning, text = m.group(1), text[m.end():]
    calls: list[ToolCall] = []
    errors: list[str] = []
    pieces: list[str] = []
    pos = 0
    for m in _CALL_RE.finditer(text):
        pieces.append(text[pos : m.start()])
        pos = m.end()
        body, closed = m.group(1).strip(), bool(m.group(2))
        if not closed:
            errors.append(f"unclosed <tool_call>: {body[:200]!r}")
            continue
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as exc:
            errors.append(f"tool call is not valid JSON ({exc.msg} at char {exc.pos}): {body[:200]!r}")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
            errors.append(f"tool call needs a string 'name': {body[:200]!r}")
            continue
        args = obj.get("arguments", {})
        if isinstance(args, str):  # some models emit the OpenAI string form; accept if it is an object
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        if not isinstance(args, dict):
            errors.append(f"tool call {obj['name']!r}: 'arguments' must be a JSON object, got {type(args).__name__}")
            continue
        calls.append(ToolCall(
            id=f"{call_id_prefix}{len(calls)}",
            function=ToolFunction(name=obj["name"], arguments=json.dumps(args, ensure_ascii=False)),
        ))
    pieces.append(text[pos:])
    stray = "</tool_call>"
    content = "".join(pieces)
    if stray in content:
        errors.append("</tool_call> without a matching <tool_call>")
        content = content.replace(stray, "")
    return AssistantTurn(content=content.strip(), reasoning_content=reasoning, tool_calls=calls, errors=errors)
