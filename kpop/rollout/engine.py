"""The one interface every rollout engine implements (embedded, vLLM), and its request types.

    engine.generate([GenerationRequest(prompt_token_ids=ids, params=SamplingParams(max_tokens=32))])
    result = await engine.agenerate(request)   # concurrent callers are batched together

A result carries the sampled token ids, the logprob of each sampled token, why generation
stopped, and the policy version that produced each token (`token_versions`): a request that
runs across `update_weights` is written by two versions, and training must know which wrote what.

Logprob convention (all engines): `log_softmax(logits / temperature)` of the sampled token
(temperature 0 -> the raw logits). top-k / top-p restrict what can be *sampled*, not the
distribution the logprob is taken from, because that is the distribution the learner recomputes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import uuid
from abc import ABC, abstractmethod
from typing import Any, Literal, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

FinishReason = Literal["stop", "length", "abort"]


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(1.0, ge=0.0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0 = off
    max_tokens: int = Field(128, ge=1)
    stop: tuple[str, ...] = ()  # stop strings, matched on the decoded completion
    stop_token_ids: tuple[int, ...] = ()  # besides the eos token(s)
    ignore_eos: bool = False
    seed: int | None = None  # same seed + same prompt + same weights -> same tokens, in any batch

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, v: Any) -> Any:
        if isinstance(v, str):
            return (v,)
        if isinstance(v, (list, tuple)) and any(not isinstance(s, str) or not s for s in v):
            raise ValueError(f"stop must be non-empty strings, got {v!r}")
        return v


def _new_request_id() -> str:
    return uuid.uuid4().hex


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_token_ids: list[int] = Field(min_length=1)
    params: SamplingParams = Field(default_factory=SamplingParams)
    request_id: str = Field(default_factory=_new_request_id)


class GenerationResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # the stop/eos token that ended generation is included
    logprobs: list[float]  # one per token_ids entry (convention in the module docstring)
    token_versions: list[int]  # policy version that sampled each token
    finish_reason: FinishReason
    stop_reason: str | int | None = None  # the stop string or stop token id that matched
    text: str | None = None  # decoded completion (cut before a matched stop string) if the engine has a tokenizer

    @property
    def policy_version(self) -> int | None:
        """The version that wrote the last token (None if no token was generated)."""
        return self.token_versions[-1] if self.token_versions else None


class EngineError(RuntimeError):
    """A request the engine cannot serve (too long, engine stopped, ...); the message says why."""


class Engine(ABC):
    """What the chat surface, the rollout worker and the benchmark need from an engine."""

    @property
    @abstractmethod
    def version(self) -> int:
        """The policy version new tokens are sampled with."""

    @abstractmethod
    def submit(self, request: GenerationRequest) -> concurrent.futures.Future:
        """Queue one request; the future resolves to its GenerationResult."""

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run `requests` to completion (blocking); results in request order."""
        futures = [self.submit(r) for r in requests]
        return [f.result() for f in futures]

    async def agenerate(self, request: GenerationRequest) -> GenerationResult:
        """One request; concurrent awaiting callers share batches. Cancelling aborts it."""
        fut = self.submit(request)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            self.abort(request.request_id)
            raise

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Stop a request; its caller gets finish_reason 'abort' with the tokens so far. Unknown ids are ignored."""

    @abstractmethod
    def pause(self) -> None:
        """Stop stepping after the current step; requests stay admitted (see each engine for their state)."""

    @abstractmethod
    def resume(self) -> None: ...

    @abstractmethod
    def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Load new weights (HF names, full or partial state) between steps; tokens sampled after
        this call are tagged `version`."""

    def close(self) -> None:
        """Release engine resources (threads, subprocesses)."""


def check_version(current: int, new: int) -> None:
    if not isinstance(new, int) or new < 0:
        raise ValueError(f"policy version must be an int >= 0, got {new!r}")
    if new < current:
        raise ValueError(f"policy version must not go backwards: engine has {current}, got {new}")
