"""The one interface every rollout engine implements (embedded, vLLM), its request types, and
`ThreadedEngine`, the scheduler-thread plumbing both backends share.

    engine.generate([GenerationRequest(prompt_token_ids=ids, params=SamplingParams(max_tokens=32))])
    result = await engine.agenerate(request)   # concurrent callers are batched together

A result carries the sampled token ids, the logprob of each sampled token, why generation
stopped, and the policy version that produced each token (`token_versions`): a request that
runs across `update_weights` is written by two versions, and training must know which wrote what.
An MoE policy's engine may also return `routes`: the experts every prompt and sampled token was
routed to (kpop.trajectory.Routes), which the learner replays.

Logprob convention (all engines): `log_softmax(logits / temperature)` of the sampled token
(temperature 0 -> the raw logits). top-k / top-p restrict what can be *sampled*, not the
distribution the logprob is taken from, because that is the distribution the learner recomputes.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import uuid
from abc import ABC, abstractmethod
from typing import Any, Literal, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from kpop.trajectory import Routes
from kpop.weight_sync import WeightHandle, WeightSync

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
    # experts of prompt_token_ids + token_ids (the last sampled token, never fed back, has none)
    routes: Routes | None = None

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
    def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int, rewind: bool = False) -> None:
        """Load new weights (HF names, full or partial state) between steps; tokens sampled after
        this call are tagged `version`. An older version is refused unless `rewind` (a learner
        restored from a checkpoint)."""

    @abstractmethod
    def receive_weights(self, handle: WeightHandle, sync: WeightSync | None = None) -> None:
        """Take a published version through its transport and load it as `update_weights` does."""

    def close(self) -> None:
        """Release engine resources (threads, subprocesses)."""


def check_version(current: int, new: int, rewind: bool = False) -> None:
    if not isinstance(new, int) or new < 0:
        raise ValueError(f"policy version must be an int >= 0, got {new!r}")
    if new < current and not rewind:
        raise ValueError(f"policy version must not go backwards: engine has {current}, got {new}")


class ThreadedEngine(Engine):
    """An engine stepped by one scheduler thread; callers reach it through an inbox.

    Shared by every backend: submit checks, abort / pause / resume, the weight-update lock and the
    inbox loop. A backend implements the hooks at the bottom (`_add`, `_abort`, `_has_work`, `_step`,
    `_load_weights`, `_fail_all`; `_check` optionally). Every hook runs under `_lock`, which is held for a whole
    step, so weights, pause and the request tables change only between steps.
    """

    thread_name = "kpop-engine"

    def __init__(self, *, max_model_len: int, has_tokenizer: bool, version: int = 0) -> None:
        check_version(0, version)
        self.max_model_len = max_model_len
        self.has_tokenizer = has_tokenizer
        self._version = version
        self._inbox: collections.deque[tuple[str, Any]] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition()
        self._paused = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self.weight_sync: WeightSync | None = None  # the transport `receive_weights` pulls through

    # -- Engine API -----------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self._version

    def submit(self, request: GenerationRequest) -> concurrent.futures.Future:
        """Queue a request; the future resolves to its `GenerationResult` (or an `EngineError`)."""
        if self._closed:
            raise EngineError("engine is closed")
        n = len(request.prompt_token_ids)
        if n >= self.max_model_len:
            raise EngineError(f"prompt of {n} tokens does not fit max_model_len={self.max_model_len} "
                              "(needs room for 1 token)")
        if request.params.stop and not self.has_tokenizer:
            raise EngineError("stop strings need an engine built with a tokenizer")
        self._check(request)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._post("add", (request, fut))
        return fut

    def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    def pause(self) -> None:
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
        self._notify()

    def receive_weights(self, handle: WeightHandle, sync: WeightSync | None = None) -> None:
        """Pull version `handle.version` through `sync` (default: `self.weight_sync`, which the
        process wiring sets) and load it. The transport hands out views into its buckets (on the GPU
        when both ends are) after verifying version and checksums, so a bad delivery raises
        `WeightSyncError` before anything is loaded and the engine keeps its weights and version.
        The pull runs outside the engine lock (steps go on); the load waits for the step, as
        `update_weights` does, and evicts the partial rollouts to re-prefill under the new weights."""
        sync = sync if sync is not None else self.weight_sync
        if sync is None:
            raise EngineError(f"weights version {handle.version} arrived but this engine has no weight_sync to take "
                              "them through")
        check_version(self._version, handle.version, handle.rewind)  # a stale handle moves nothing
        self.update_weights(sync.receive(handle), handle.version, handle.rewind)

    def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int, rewind: bool = False) -> None:
        with self._lock:  # between steps
            check_version(self._version, version, rewind)
            self._load_weights(state_dict)
            self._version = version
        self._notify()

    def close(self) -> None:
        self._closed = True
        self._notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        closed = EngineError("engine closed")
        with self._lock:
            self._fail_all(closed)
            while self._inbox:  # requests the thread never saw
                kind, item = self._inbox.popleft()
                if kind == "add" and not item[1].done():
                    item[1].set_exception(closed)

    # -- the scheduler thread -------------------------------------------------------------------
    def _post(self, kind: str, item: Any) -> None:
        self._inbox.append((kind, item))
        if self._thread is None:  # started by the first request: an idle engine costs no thread
            with self._wake:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
                    self._thread.start()
        self._notify()

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def _loop(self) -> None:
        while not self._closed:
            with self._wake:
                while not self._closed and not self._inbox and (self._paused or not self._has_work()):
                    self._wake.wait(timeout=1.0)
            if self._closed:
                return
            try:
                with self._lock:
                    self._drain_inbox()
                    if not self._paused and self._has_work():
                        self._step()
            except Exception as exc:  # a backend bug fails the requests in flight, not the thread
                with self._lock:
                    self._fail_all(EngineError(f"engine step failed: {type(exc).__name__}: {exc}"))

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "add":
                request, fut = item
                try:
                    self._add(request, fut)
                except Exception as exc:
                    if not fut.done():
                        fut.set_exception(EngineError(f"request {request.request_id} rejected: "
                                                      f"{type(exc).__name__}: {exc}"))
            else:
                self._abort(item)

    # -- backend hooks (called with `_lock` held, on the scheduler thread except `_check`) -------
    def _check(self, request: GenerationRequest) -> None:
        """Reject a request the backend cannot serve (raise `EngineError`); called by `submit`."""

    @abstractmethod
    def _add(self, request: GenerationRequest, future: concurrent.futures.Future) -> None:
        """Admit a request; resolve `future` with its result when it finishes."""

    @abstractmethod
    def _abort(self, request_id: str) -> None:
        """Finish the request with finish_reason 'abort' and the tokens so far (unknown ids: nothing)."""

    @abstractmethod
    def _has_work(self) -> bool:
        """Whether a step would advance any request."""

    @abstractmethod
    def _step(self) -> None:
        """One scheduling step over the admitted requests."""

    @abstractmethod
    def _load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load weights and re-prefill every unfinished request under them (tokens keep their version)."""

    @abstractmethod
    def _fail_all(self, exc: EngineError) -> None:
        """Fail every admitted, unfinished request with `exc` and forget it."""
