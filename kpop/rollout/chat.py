"""An OpenAI-compatible chat-completions surface over any `Engine`, keeping tokens for training.

    client = ChatClient(engine, tokenizer)
    completion = client.create(messages, tools=tools, temperature=0.7, max_tokens=64)
    completion.choices[0].message        # {"role": "assistant", "content": ..., "tool_calls": [...]}
    completion.choices[0].token_ids      # what the model sampled, with .token_logprobs / .token_versions

Environment loops and agents talk OpenAI; the engine stays hidden. `ChatSession` is an agent for
`environments.run_episode` that also records the episode as one token stream (`TokenTrace`):
each turn's prompt is the previous prompt + the model's *exact* tokens + the tokens of what the
environment added, never a re-tokenisation of the model's text (BPE does not round-trip, and the
learner must score the tokens that were sampled). A session with a `teacher` (an oracle agent)
records the teacher's turns through the same prompt building, as the tokens the model would have
to write: that is what SFT demonstrations are.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from environments.core import Agent
from environments.runner import EpisodeTruncated
from kpop.policy.chat import parse_assistant
from kpop.rollout.engine import Engine, GenerationRequest, GenerationResult, SamplingParams
from kpop.trajectory import Routes

Message = dict[str, Any]

# OpenAI request fields -> SamplingParams fields (top_k and ignore_eos are common extensions)
_SAMPLING_ALIASES = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "max_tokens": "max_tokens",
    "max_completion_tokens": "max_tokens", "stop": "stop", "seed": "seed", "ignore_eos": "ignore_eos",
    "stop_token_ids": "stop_token_ids",
}


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[dict[str, Any]] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class Choice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int
    message: Message
    finish_reason: Literal["stop", "length", "tool_calls", "abort"]
    logprobs: ChoiceLogprobs | None = None  # OpenAI form, when the request asked for logprobs
    # KPop extensions: always present, what training needs
    token_ids: list[int]
    token_logprobs: list[float]
    token_versions: list[int]
    # experts of prompt_token_ids + token_ids per MoE layer, where the engine records them (routing
    # replay); for training only, so left out of the chat-completion JSON
    routes: Routes | None = Field(default=None, exclude=True)
    tool_call_errors: list[str] = Field(default_factory=list)  # malformed calls the parser dropped


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    prompt_token_ids: list[int]  # KPop extension


class ChatClient:
    """`engine` None: a client that only renders and tokenises (teacher sessions, demonstrations)."""

    def __init__(self, engine: Engine | None, tokenizer: Any, model: str = "kpop-policy",
                 defaults: SamplingParams | None = None) -> None:
        if tokenizer.chat_template is None:
            raise ValueError("ChatClient needs a tokenizer with a chat template")
        self.engine, self.tokenizer, self.model = engine, tokenizer, model
        self.defaults = defaults or SamplingParams()

    # -- rendering ----------------------------------------------------------------------------
    def render(self, messages: list[Message], tools: list[dict] | None = None, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- completions --------------------------------------------------------------------------
    def requests(self, messages: list[Message], tools: list[dict] | None = None, *, n: int = 1,
                 prompt_token_ids: list[int] | None = None, **sampling: Any) -> list[GenerationRequest]:
        """The engine requests of one chat-completion call (n samples; seeds seed, seed+1, ...)."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of chat messages")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        unknown = sorted(set(sampling) - set(_SAMPLING_ALIASES))
        if unknown:
            raise TypeError(f"unsupported chat-completion argument(s) {unknown}; supported: n, logprobs, "
                            f"{sorted(_SAMPLING_ALIASES)}")
        fields = {_SAMPLING_ALIASES[k]: v for k, v in sampling.items() if v is not None}
        params = SamplingParams(**{**self.defaults.model_dump(), **fields})
        ids = prompt_token_ids if prompt_token_ids is not None else self.encode(self.render(messages, tools))
        out = []
        for i in range(n):
            p = params if params.seed is None or i == 0 else params.model_copy(update={"seed": params.seed + i})
            out.append(GenerationRequest(prompt_token_ids=list(ids), params=p))
        return out

    def create(self, messages: list[Message], tools: list[dict] | None = None, *, n: int = 1,
               logprobs: bool = False, prompt_token_ids: list[int] | None = None, **sampling: Any) -> ChatCompletion:
        reqs = self.requests(messages, tools, n=n, prompt_token_ids=prompt_token_ids, **sampling)
        return self._completion(reqs[0].prompt_token_ids, self._engine().generate(reqs), logprobs)

    async def acreate(self, messages: list[Message], tools: list[dict] | None = None, *, n: int = 1,
                      logprobs: bool = False, prompt_token_ids: list[int] | None = None,
                      **sampling: Any) -> ChatCompletion:
        import asyncio

        reqs = self.requests(messages, tools, n=n, prompt_token_ids=prompt_token_ids, **sampling)
        engine = self._engine()
        results = await asyncio.gather(*(engine.agenerate(r) for r in reqs))
        return self._completion(reqs[0].prompt_token_ids, list(results), logprobs)

    def _engine(self) -> Engine:
        if self.engine is None:
            raise RuntimeError("this ChatClient has no engine (it only renders and tokenises)")
        return self.engine

    def _completion(self, prompt_ids: list[int], results: list[GenerationResult], want_logprobs: bool) -> ChatCompletion:
        choices = []
        for i, r in enumerate(results):
            text = self.tokenizer.decode(r.token_ids, skip_special_tokens=False)
            if isinstance(r.stop_reason, str):
                text = text[: text.find(r.stop_reason)]
            turn = parse_assistant(text)
            finish = "tool_calls" if turn.tool_calls and r.finish_reason == "stop" else r.finish_reason
            lp = None
            if want_logprobs:
                pieces = [self.tokenizer.decode([t], skip_special_tokens=False) for t in r.token_ids]
                lp = ChoiceLogprobs(content=[TokenLogprob(token=s, logprob=v, bytes=list(s.encode()))
                                             for s, v in zip(pieces, r.logprobs)])
            choices.append(Choice(index=i, message=turn.to_message(), finish_reason=finish, logprobs=lp,
                                  token_ids=r.token_ids, token_logprobs=r.logprobs,
                                  token_versions=r.token_versions, routes=r.routes, tool_call_errors=turn.errors))
        completion_tokens = sum(len(r.token_ids) for r in results)
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=self.model, choices=choices,
            usage=Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion_tokens,
                        total_tokens=len(prompt_ids) + completion_tokens),
            prompt_token_ids=prompt_ids,
        )


@dataclass
class TokenTrace:
    """One episode as a token stream: model tokens have mask 1, their logprob and version;
    everything else (prompts, tool results, chat markup) has mask 0, logprob 0."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    versions: list[int | None] = field(default_factory=list)
    # the latest engine result's routes: its prompt was this whole trace, so they cover a prefix of
    # it, each token with the route of its last pass through the engine
    routes: Routes | None = None

    def extend(self, ids: list[int], logprobs: list[float] | None = None, versions: list[int] | None = None) -> None:
        self.token_ids += ids
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)
        self.loss_mask += [1 if logprobs is not None else 0] * len(ids)
        self.versions += versions if versions is not None else [None] * len(ids)

    def set_routes(self, routes: Routes | None) -> None:
        if routes is not None and routes.shape[0] <= len(self.token_ids):
            self.routes = routes

    def episode_routes(self) -> Routes | None:
        """Routes over every token of the trace (tokens after the last engine pass have none)."""
        return None if self.routes is None else self.routes.resized(len(self.token_ids))

    def segments(self) -> list[tuple[int, int, int]]:
        """(start, end, version) runs of model tokens written by one policy version."""
        out: list[tuple[int, int, int]] = []
        for i, v in enumerate(self.versions):
            if v is None:
                continue
            if out and out[-1][1] == i and out[-1][2] == v:
                out[-1] = (out[-1][0], i + 1, v)
            else:
                out.append((i, i + 1, v))
        return out


class EpisodeTooLong(EpisodeTruncated):
    """The episode's tokens reached the session's `max_total_tokens` (rollout.max_episode_tokens)."""

    cause = "max_episode_tokens"


class ChatSession:
    """An `environments` agent (async `(messages, tools) -> assistant message`) that records the
    episode's tokens in `trace`. If the env rewrites earlier messages (so the new prompt does not
    extend the last one) the trace restarts from the new prompt and `restarts` counts it.

    `max_total_tokens` bounds prompt + completions of the whole episode: each turn's max_tokens is
    cut to what is left. A turn that hits that bound, or a prompt that leaves no room, raises
    `EpisodeTooLong` (the runner marks the episode truncated, reward 0); the cut turn's tokens
    stay in the trace, its text never reaches the env.

    `teacher`: an agent that writes the turns instead of the engine (oracle demonstrations). Its
    message is rendered by the chat template after the same prompt, up to and including the
    end-of-turn token, and recorded as model tokens (logprob 0, version `teacher_version`)."""

    def __init__(self, client: ChatClient, max_total_tokens: int | None = None, *, teacher: Agent | None = None,
                 teacher_version: int = 0, **sampling: Any) -> None:
        self.client, self.sampling, self.max_total_tokens = client, sampling, max_total_tokens
        self.teacher, self.teacher_version = teacher, teacher_version
        self.trace = TokenTrace()
        self.completions: list[ChatCompletion] = []
        self.restarts = 0
        self._history: list[Message] | None = None  # messages incl. our last answer
        self._ended_with_eos = False

    async def __call__(self, messages: list[Message], tools: list[dict] | None = None) -> Message:
        prompt = self._prompt_ids(messages, tools)
        room = None if self.max_total_tokens is None else self.max_total_tokens - len(prompt)
        if room is not None and room < 1:
            raise EpisodeTooLong(f"episode cut at max_total_tokens={self.max_total_tokens}: the prompt of turn "
                                 f"{self._turn(messages)} has {len(prompt)} tokens")
        if self.teacher is not None:
            message, ids = await self._teach(messages, tools)
            self.trace.extend(ids, [0.0] * len(ids), [self.teacher_version] * len(ids))
            ended, cut = True, room is not None and len(ids) > room
        else:
            sampling = dict(self.sampling)
            limit = sampling.get("max_tokens") or self.client.defaults.max_tokens
            if room is not None:
                sampling["max_tokens"] = min(limit, room)
            completion = await self.client.acreate(messages, tools, prompt_token_ids=prompt, **sampling)
            choice = completion.choices[0]
            self.completions.append(completion)
            self.trace.extend(choice.token_ids, choice.token_logprobs, choice.token_versions)
            self.trace.set_routes(choice.routes)
            message = choice.message
            ended = bool(choice.token_ids) and choice.token_ids[-1] == self.client.tokenizer.eos_token_id
            # length-stopped where the episode budget, not the per-turn max_tokens, was the bound
            cut = room is not None and room <= limit and choice.finish_reason == "length"
        if cut:
            raise EpisodeTooLong(f"episode cut at max_total_tokens={self.max_total_tokens} in turn "
                                 f"{self._turn(messages)} (prompt {len(prompt)} tokens, {room} left for the reply)")
        self._history = [*messages, message]
        self._ended_with_eos = ended
        return message

    @staticmethod
    def _turn(messages: list[Message]) -> int:
        return 1 + sum(m.get("role") == "assistant" for m in messages)

    async def _teach(self, messages: list[Message], tools: list[dict] | None) -> tuple[Message, list[int]]:
        """The teacher's next message and the tokens the model would write for it."""
        c = self.client
        message = await self.teacher(messages, tools or [])
        prompt = c.render(messages, tools)
        turn = c.render([*messages, message], tools, add_generation_prompt=False)
        eos = c.tokenizer.eos_token
        end = turn.rfind(eos) + len(eos)
        if not turn.startswith(prompt) or end <= len(prompt):
            raise ValueError("chat template is not prefix-stable: cannot tokenise the teacher's turn after its prompt")
        return message, c.encode(turn[len(prompt):end])

    def _prompt_ids(self, messages: list[Message], tools: list[dict] | None) -> list[int]:
        c = self.client
        full = c.render(messages, tools)
        if self._history is not None and messages[: len(self._history)] == self._history:
            prev = c.render(self._history, tools, add_generation_prompt=False)
            eos_text = c.tokenizer.eos_token
            end = prev.rfind(eos_text)
            if full.startswith(prev) and end >= 0:
                # after the model's last token: the rest of its turn's markup, then the new messages
                tail = prev[end + len(eos_text):] if self._ended_with_eos else prev[end:]
                self.trace.extend(c.encode(tail + full[len(prev):]))
                return list(self.trace.token_ids)
        if self._history is not None:
            self.restarts += 1
        self.trace = TokenTrace()
        self.trace.extend(c.encode(full))
        return list(self.trace.token_ids)
