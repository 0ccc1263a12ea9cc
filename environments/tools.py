"""Tools: typed Python functions whose OpenAI JSON schema is generated from their signature.

    @tool
    def calculator(expression: str) -> str:
        '''Evaluate an arithmetic expression.

        Args:
            expression: e.g. "17 + 25".
        '''

The first docstring paragraph becomes the description and the `Args:` section (Google style)
describes the parameters. Arguments are validated strictly with pydantic (no "17" -> 17
coercion: a policy should learn to send the declared types). A tool signals a user-facing
failure by raising `ToolError`; any other exception is a bug in the environment and
propagates, so the runner marks the episode failed instead of hiding it.

Arguments are model output, so hostile by assumption: JSON nested deeper than
`MAX_ARGUMENT_DEPTH` or strings that are not valid Unicode (lone surrogates) are refused with a
tool error before the tool runs. A result is cut to `MAX_TOOL_OUTPUT_BYTES` of UTF-8 (with a note
saying how much was cut): a 100 MB query result must not become a 100 MB message.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import threading
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, get_type_hints

import pydantic

MAX_TOOL_OUTPUT_BYTES = 8192  # per tool message; the rest is cut with a note
MAX_ARGUMENT_DEPTH = 32  # nesting of a call's JSON arguments


async def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run blocking `fn` in a fresh daemon thread and await it.

    Not the loop's default executor: that has a handful of workers, so a few hung envs would
    starve every other episode, and `asyncio.run` waits for its threads at exit. A daemon thread
    that hangs is simply abandoned when its caller times out.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():  # the awaiting side was cancelled by a timeout
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def work() -> None:
        try:
            value, ok = fn(*args, **kwargs), True
        except Exception as exc:  # handed to the awaiting coroutine, which re-raises it
            value, ok = exc, False
        except BaseException as exc:  # sys.exit() in an env must not end the caller's process
            value, ok = RuntimeError(f"{type(exc).__name__}({exc}) raised in {fn!r}"), False
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    threading.Thread(target=work, name=f"kpop-env-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return await fut


class ToolError(Exception):
    """The tool refuses the call (bad value, missing record); the message goes back to the agent."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    fn: Callable[..., Any]
    args_model: type[pydantic.BaseModel]
    parameters: dict[str, Any]  # JSON schema of the arguments

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    def bind(self, fn: Callable[..., Any]) -> Tool:
        """The same tool calling `fn`: reuse the schema for a method of a per-episode object."""
        return replace(self, fn=fn)

    def schema(self) -> dict[str, Any]:
        """The OpenAI `tools` entry."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def validate(self, arguments: Any) -> dict[str, Any]:
        """Parse and check arguments (a JSON string or a dict); raise `ToolError` saying what is wrong."""
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise ToolError(f"arguments are not valid JSON ({exc.msg} at position {exc.pos})") from None
            except RecursionError:  # json's C parser recurses per nesting level
                raise ToolError(f"arguments are nested more than {MAX_ARGUMENT_DEPTH} levels deep") from None
        if not isinstance(arguments, dict):
            raise ToolError(f"arguments must be a JSON object, got {type(arguments).__name__}")
        _check_json_value(arguments)
        try:
            parsed = self.args_model.model_validate(arguments, strict=True)
        except pydantic.ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in exc.errors())
            raise ToolError(f"invalid arguments for {self.name}: {problems}") from None
        return {k: getattr(parsed, k) for k in type(parsed).model_fields}


def _check_json_value(value: Any) -> None:
    """Refuse argument trees deeper than MAX_ARGUMENT_DEPTH and strings that are not valid Unicode
    (a lone surrogate from a JSON escape cannot be encoded: it would fail the episode later)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_ARGUMENT_DEPTH:
            raise ToolError(f"arguments are nested more than {MAX_ARGUMENT_DEPTH} levels deep")
        if isinstance(node, str):
            _check_text(node)
        elif isinstance(node, dict):
            for k, v in node.items():
                _check_text(k)
                stack.append((v, depth + 1))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ToolError(f"arguments contain a lone surrogate {text[exc.start]!r} (not valid Unicode) "
                        f"at position {exc.start} of a string") from None


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
    """Turn a typed function (sync or async) into a `Tool`. Usable as `@tool` or `@tool(name=...)`."""

    def wrap(f: Callable[..., Any]) -> Tool:
        return make_tool(f, name=name)

    return wrap(fn) if fn is not None else wrap


def make_tool(fn: Callable[..., Any], *, name: str | None = None) -> Tool:
    sig = inspect.signature(fn)
    hints = get_type_hints(fn)
    doc = inspect.getdoc(fn) or ""
    description, arg_docs = _parse_docstring(doc)
    fields: dict[str, Any] = {}
    for pname, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"tool {fn.__name__}: *args/**kwargs cannot be described by a JSON schema")
        if pname not in hints:
            raise TypeError(f"tool {fn.__name__}: parameter {pname!r} needs a type hint")
        default = ... if p.default is p.empty else p.default
        fields[pname] = (hints[pname], pydantic.Field(default, description=arg_docs.get(pname)))
    model = pydantic.create_model(f"{fn.__name__}_args", __config__=pydantic.ConfigDict(extra="forbid"), **fields)
    tool_name = name or fn.__name__
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", tool_name):
        raise ValueError(f"tool name {tool_name!r} must match [A-Za-z0-9_-]{{1,64}} (OpenAI's rule)")
    return Tool(name=tool_name, description=description or tool_name, fn=fn, args_model=model,
                parameters=_strip_titles(model.model_json_schema()))


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    paragraphs = doc.split("\n\n")
    description = " ".join(paragraphs[0].split()) if paragraphs and not paragraphs[0].startswith("Args:") else ""
    args: dict[str, str] = {}
    m = re.search(r"^Args:\s*\n(.*?)(?:\n\S|\Z)", doc, flags=re.S | re.M)
    if m:
        current = None
        for line in m.group(1).splitlines():
            item = re.match(r"\s+(\w+)(?:\s*\([^)]*\))?:\s*(.*)", line)
            if item and (current is None or len(line) - len(line.lstrip()) <= 4):
                current = item.group(1)
                args[current] = item.group(2).strip()
            elif current and line.strip():
                args[current] = (args[current] + " " + line.strip()).strip()
    return description, args


def _strip_titles(schema: Any) -> Any:
    # pydantic adds "title" everywhere; OpenAI ignores it and it costs prompt tokens.
    if isinstance(schema, dict):
        return {k: _strip_titles(v) for k, v in schema.items() if k != "title" or not isinstance(v, str)}
    if isinstance(schema, list):
        return [_strip_titles(v) for v in schema]
    return schema


def format_result(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def tool_message(call_id: str, name: str, content: str) -> dict[str, Any]:
    """The tool message for a call: every string valid UTF-8 (a lone surrogate, echoed from the
    model's call, would make the trajectory unencodable) and the content cut to MAX_TOOL_OUTPUT_BYTES."""
    data = content.encode("utf-8", "replace")  # a lone surrogate becomes '?'
    if len(data) > MAX_TOOL_OUTPUT_BYTES:
        kept = data[:MAX_TOOL_OUTPUT_BYTES].decode("utf-8", "ignore")  # never split a character
        content = f"{kept}\n[output truncated: {len(data)} bytes, the first {MAX_TOOL_OUTPUT_BYTES} shown]"
    else:
        content = data.decode("utf-8")
    return {"role": "tool", "tool_call_id": _utf8(call_id), "name": _utf8(name), "content": content}


def _utf8(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8")


class Toolbox:
    """The tools of one episode. `call` turns any tool call, however malformed, into a tool message."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]]):
        self._tools: dict[str, Tool] = {}
        for t in tools:
            t = t if isinstance(t, Tool) else make_tool(t)
            if t.name in self._tools:
                raise ValueError(f"duplicate tool name {t.name!r}")
            self._tools[t.name] = t

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    @property
    def has_async(self) -> bool:
        return any(t.is_async for t in self._tools.values())

    def __getitem__(self, name: str) -> Tool:
        return self._tools[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self._tools.values()]

    def _prepare(self, call: Any) -> tuple[str, str, Tool | None, dict[str, Any] | None, str | None]:
        """-> (call id, tool name, tool, kwargs, error)."""
        if not isinstance(call, dict):
            return "", "", None, None, f"error: a tool call must be an object, got {type(call).__name__}"
        call_id = call.get("id") if isinstance(call.get("id"), str) else ""
        fn = call.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            return call_id, "", None, None, "error: a tool call needs function.name (a string)"
        name = fn["name"]
        t = self._tools.get(name)
        if t is None:
            return call_id, name, None, None, f"error: unknown tool {name!r}; available: {', '.join(self._tools)}"
        try:
            kwargs = t.validate(fn.get("arguments", "{}"))
        except ToolError as exc:
            return call_id, name, t, None, f"error: {exc}"
        return call_id, name, t, kwargs, None

    def call(self, call: Any) -> dict[str, Any]:
        call_id, name, t, kwargs, err = self._prepare(call)
        if err is None:
            assert t is not None and kwargs is not None
            try:
                result = t.fn(**kwargs)
                if inspect.isawaitable(result):  # an async tool called from sync code
                    result = asyncio.run(result)
                content = format_result(result)
            except ToolError as exc:
                content = f"error: {exc}"
        else:
            content = err
        return tool_message(call_id, name, content)

    async def acall(self, call: Any) -> dict[str, Any]:
        call_id, name, t, kwargs, err = self._prepare(call)
        if err is not None:
            return tool_message(call_id, name, err)
        assert t is not None and kwargs is not None
        try:
            if t.is_async:
                result = await t.fn(**kwargs)
            else:
                result = await in_thread(t.fn, **kwargs)
            content = format_result(result)
        except ToolError as exc:
            content = f"error: {exc}"
        return tool_message(call_id, name, content)
