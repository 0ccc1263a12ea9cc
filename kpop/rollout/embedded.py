"""The embedded engine: continuous batching of the policy through its `HybridCache`.

    engine = EmbeddedEngine(model, tokenizer, max_seqs=32)
    results = engine.generate(requests)            # blocking
    result = await engine.agenerate(request)       # from any event loop; callers share batches

One scheduler thread (`ThreadedEngine`) steps the model. Every step it feeds each running sequence the part of its
context (prompt + generated tokens) that is not cached yet, so prefill, decode, chunked prefill
and re-prefill are one code path: a fresh sequence is fed its prompt, a decoding one its last
token, a preempted one everything again. A sequence whose context is fully fed gets a token.

State decisions:
* `pause()` keeps every request's cache; `resume()` continues where it stopped.
* `update_weights()` frees the cache of every unfinished request and re-prefills its prompt and
  tokens so far under the new weights: a Lightning state computed by the old weights cannot be
  corrected, and mixing it with new weights would make the rollout logprobs differ from what the
  learner recomputes. Tokens keep the version that sampled them (`token_versions`).
* When the cache is full, the most recently admitted request is preempted the same way
  (freed, re-prefilled later), as vLLM's recompute preemption does.
* Shared prompts: requests with the same prompt (the G samples of a group) are prefilled once. The
  first admitted one leads; the others wait, admitted but not fed, and when the leader's prompt is
  cached they fork its cache (Lightning states and MLA rows copied: `HybridCache.fork`) and sample
  their first token from the leader's logits with their own seeds. If the leader goes first
  (abort, preemption), the next follower leads. `stats["prefill_tokens_saved"]` counts the gain.
* On a GPU, decode steps replay CUDA graphs (kpop/rollout/graphs.py) and sampling runs on the
  device; a step reads the device back once, for its tokens, logprobs and routes together.
* Routing replay (MoE policies): every token fed through the model records its experts per MoE
  layer; a token fed again (re-prefill) keeps the route of its last pass, the one the tokens
  sampled after it saw. The result's `routes` cover prompt + generated tokens.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from kpop.policy.cache import CacheFull, HybridCache
from kpop.rollout.engine import EngineError, GenerationRequest, GenerationResult, SamplingParams, ThreadedEngine
from kpop.rollout.routes import routes_from_passes
from kpop.rollout.sampling import SamplingBatch, sample


@dataclass
class _Seq:
    req: GenerationRequest
    future: concurrent.futures.Future
    order: int  # admission order: preemption evicts the youngest
    seed: int  # sampling noise is a hash of (seed, token index): kpop/rollout/sampling.py
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    slot: int | None = None
    cached: int = 0  # tokens of `context` already in the cache
    leader: "_Seq | None" = None  # a request with the same prompt whose prefill this one waits to fork
    followers: list["_Seq"] = field(default_factory=list)
    prefix_key: tuple[int, ...] | None = None  # set while this request leads its prompt's prefill
    routes: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (first position, ids [n, layers, k]) per pass

    @property
    def params(self) -> SamplingParams:
        return self.req.params

    @property
    def context(self) -> list[int]:
        return self.req.prompt_token_ids + self.tokens

    def __post_init__(self) -> None:
        self.length = len(self.req.prompt_token_ids)  # len(context), kept as tokens are appended

    def feed(self, n: int) -> list[int]:
        """The next `n` uncached tokens of `context`."""
        p = len(self.req.prompt_token_ids)
        if self.cached >= p:
            return self.tokens[self.cached - p : self.cached - p + n]
        return self.context[self.cached : self.cached + n]


class EmbeddedEngine(ThreadedEngine):
    thread_name = "kpop-embedded-engine"

    def __init__(
        self,
        model: Any,  # kpop.policy.model.BailingMoeV2_5ForCausalLM
        tokenizer: Any | None = None,  # needed for stop strings and `result.text`
        *,
        max_seqs: int = 32,
        block_size: int | None = None,  # tokens per cache page; None: 64 on a GPU, 16 on CPU
        num_blocks: int | None = None,
        max_model_len: int | None = None,
        max_batch_tokens: int = 4096,  # prefill tokens per step (chunked beyond that)
        version: int = 0,
        seed: int = 0,
        cuda_graphs: bool = True,  # decode steps on a GPU replay captured graphs (kpop/rollout/graphs.py)
        share_prefix: bool = True,  # requests with one prompt prefill it once and fork the cache
    ) -> None:
        if max_batch_tokens < max_seqs:
            raise ValueError(f"max_batch_tokens ({max_batch_tokens}) must be >= max_seqs ({max_seqs})")
        self.model = model.eval()
        self.tokenizer = tokenizer
        max_model_len = max_model_len or int(model.config.max_position_embeddings)
        self.max_batch_tokens = max_batch_tokens
        if block_size is None:
            # the GPU MLA decode kernels read whole 64-token tiles from one page (the Hopper one
            # only then runs: kernels/mla/decode_hopper.py); on CPU smaller pages waste less memory
            block_size = 64 if next(model.parameters()).is_cuda else 16
        num_blocks = num_blocks or max_seqs * -(-min(max_model_len, 2048) // block_size)
        if -(-max_model_len // block_size) > num_blocks:
            max_model_len = num_blocks * block_size  # one sequence must always fit alone
        self.cache = HybridCache.for_model(model, max_seqs=max_seqs, num_blocks=num_blocks, block_size=block_size,
                                           max_seq_len=max_model_len)
        self.graphs = None
        if self.cache.device.type == "cuda":
            for module in model.modules():  # the grouped MoE kernel then reads the experts in place
                if hasattr(module, "pack_experts"):
                    module.pack_experts()
            if cuda_graphs:
                from kpop.rollout.graphs import DecodeGraphs

                self.graphs = DecodeGraphs(model, self.cache, max_seqs)
        super().__init__(max_model_len=max_model_len, has_tokenizer=tokenizer is not None, version=version)
        eos = model.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self._rng = torch.Generator().manual_seed(seed)
        self._order = itertools.count()
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._running: list[_Seq] = []
        self.share_prefix = share_prefix
        self._leaders: dict[tuple[int, ...], _Seq] = {}  # prompt -> the admitted request prefilling it
        self.num_experts = int(model.config.num_experts or 0)
        # steps, prefill_tokens, decode_tokens, preemptions, reprefills, forks, prefill_tokens_saved
        self.stats = collections.Counter()

    # -- ThreadedEngine hooks -------------------------------------------------------------------
    def _check(self, request: GenerationRequest) -> None:
        vocab = self.model.config.vocab_size
        bad = [t for t in request.prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise EngineError(f"request {request.request_id}: prompt token ids {bad[:5]} outside the vocabulary [0, {vocab})")

    def _add(self, request: GenerationRequest, future: concurrent.futures.Future) -> None:
        seed = request.params.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._rng))
        self._waiting.append(_Seq(request, future, next(self._order), seed))

    def _abort(self, request_id: str) -> None:
        for seq in [s for s in [*self._running, *self._waiting] if s.req.request_id == request_id]:
            self._finish(seq, "abort")

    def _has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def _load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        load_into(self.model, state_dict)
        for seq in sorted(self._running, key=lambda s: s.order, reverse=True):
            self._evict(seq)
            self.stats["reprefills"] += 1

    def _fail_all(self, exc: EngineError) -> None:
        for seq in [*self._running, *self._waiting]:
            self._release(seq)
            if not seq.future.done():
                seq.future.set_exception(exc)
        self._running, self._waiting = [], collections.deque()

    # -- one step -------------------------------------------------------------------------------
    def _step(self) -> None:
        """Admit waiting requests, run one forward over every running sequence, sample."""
        self._admit()
        batch = self._plan()
        if not batch:
            return
        slots = [s.slot for s, _ in batch]
        lens = [n for _, n in batch]
        ids = [t for s, n in batch for t in s.feed(n)]
        if self.graphs is not None and len(ids) == len(batch) and all(s.cached for s, _ in batch):
            logits, routes = self._graph_decode(ids, slots)
        else:
            logits, routes = self.model.forward_step(torch.tensor(ids).to(self.cache.device, non_blocking=True), slots,
                                                     lens, self.cache, return_expert_ids=True)
        self.stats["steps"] += 1
        ready = [i for i, (seq, n) in enumerate(batch) if seq.cached + n == seq.length]
        seqs = [batch[i][0] for i in ready]
        for i in list(ready):  # a finished shared prefill: its followers fork it and sample from its logits
            if batch[i][0].prefix_key is not None:
                for f in self._fork_followers(batch[i][0]):
                    seqs.append(f)
                    ready.append(i)
        if seqs:
            sb = SamplingBatch.of([s.params for s in seqs], [s.seed for s in seqs], [len(s.tokens) for s in seqs],
                                  logits.device)
            same = ready == list(range(len(batch)))
            rows = logits if same else logits[torch.tensor(ready, device=logits.device)]
            tokens, logprobs = sample(rows, sb)
        # one read back per step: the sampled tokens, their logprobs and the routes
        tokens, logprobs, routes = _to_host(tokens if seqs else None, logprobs if seqs else None, routes,
                                            torch.uint8 if self.num_experts <= 256 else torch.int32)
        offset = decoded = 0
        for seq, n in batch:
            if seq.cached and n == 1:
                decoded += 1
            if routes is not None:
                seq.routes.append((seq.cached, routes[offset : offset + n]))
            offset += n
            seq.cached += n
        self.stats["decode_tokens"] += decoded
        self.stats["prefill_tokens"] += offset - decoded
        for seq in seqs:
            if seq.cached < seq.length:  # a follower: the leader's cache and routes are its own now
                seq.cached = seq.leader.cached
                seq.routes = list(seq.leader.routes)
                seq.leader.followers.remove(seq)
                seq.leader = None
        if not seqs:
            return
        for seq, tok, lp in zip(seqs, tokens.tolist(), logprobs.tolist()):
            seq.tokens.append(tok)
            seq.length += 1
            seq.logprobs.append(lp)
            seq.versions.append(self._version)
            self._check_stop(seq)

    def _graph_decode(self, ids: list[int], slots: list[int]):
        try:
            return self.graphs.decode(ids, slots)
        except torch.cuda.CudaError:
            raise
        except Exception as exc:  # capture refused (an op that syncs): step eagerly from now on
            import warnings

            warnings.warn(f"CUDA-graph decode off, stepping eagerly: {type(exc).__name__}: {exc}", stacklevel=2)
            self.stats["graph_failures"] += 1
            self.graphs = None
            return self.model.forward_step(torch.tensor(ids).to(self.cache.device), slots, [1] * len(ids), self.cache,
                                           return_expert_ids=True)

    def _fork_followers(self, leader: _Seq) -> list[_Seq]:
        """After the step that cached `leader`'s whole prompt (and before it is fed a token), copy
        that cache to each follower; followers that do not fit any more prefill on their own."""
        if self._leaders.get(leader.prefix_key) is leader:
            del self._leaders[leader.prefix_key]
        leader.prefix_key = None
        forked = []
        for f in list(leader.followers):
            try:
                self.cache.fork(leader.slot, f.slot)
            except CacheFull:
                leader.followers.remove(f)
                f.leader = None
                continue
            forked.append(f)
            self.stats["forks"] += 1
            self.stats["prefill_tokens_saved"] += len(f.req.prompt_token_ids)
        return forked

    def _admit(self) -> None:
        bs = self.cache.block_size
        while self._waiting and self.cache.num_free_slots:
            seq = self._waiting[0]
            # leave a block of headroom per running sequence, or the newcomer is preempted at once
            need = -(-seq.length // bs) + len(self._running)
            if self._running and need > self.cache.num_free_blocks:
                return
            self._waiting.popleft()
            seq.slot, seq.cached = self.cache.allocate(), 0
            self._running.append(seq)
            if self.share_prefix and not seq.tokens:  # a fresh request: share its prompt's prefill
                key = tuple(seq.req.prompt_token_ids)
                leader = self._leaders.setdefault(key, seq)
                if leader is seq:
                    seq.prefix_key = key
                else:
                    seq.leader = leader
                    leader.followers.append(seq)

    def _plan(self) -> list[tuple[_Seq, int]]:
        """(sequence, tokens to feed) for this step: decodes first, then prefill chunks within
        `max_batch_tokens`; preempts the youngest sequences until the step fits the cache."""
        while True:
            budget = self.max_batch_tokens
            batch = []
            for seq in sorted(self._running, key=lambda s: (s.length - s.cached > 1, s.order)):
                if seq.leader is not None:  # waits for its leader's prefill
                    continue
                n = min(seq.length - seq.cached, budget)
                if n > 0:
                    batch.append((seq, n))
                    budget -= n
            if self.cache.can_fit([s.slot for s, _ in batch], [n for _, n in batch]):
                return batch
            victim = max(self._running, key=lambda s: s.order)
            self._evict(victim)
            self.stats["preemptions"] += 1

    def _evict(self, seq: _Seq) -> None:
        """Free `seq`'s cache and put it first in line; it re-prefills its whole context."""
        self._release(seq)
        self._running.remove(seq)
        self._waiting.appendleft(seq)

    def _release(self, seq: _Seq) -> None:
        if seq.slot is not None:
            self.cache.free(seq.slot)
        seq.slot, seq.cached = None, 0
        if seq.leader is not None:
            seq.leader.followers.remove(seq)
            seq.leader = None
        if seq.prefix_key is not None:
            if self._leaders.get(seq.prefix_key) is seq:
                del self._leaders[seq.prefix_key]
            if seq.followers:  # the first follower prefills the prompt for the others now
                heir, rest = seq.followers[0], seq.followers[1:]
                heir.leader, heir.prefix_key, heir.followers = None, seq.prefix_key, rest
                for f in rest:
                    f.leader = heir
                self._leaders[seq.prefix_key] = heir
            seq.prefix_key = None
        seq.followers = []

    def _check_stop(self, seq: _Seq) -> None:
        p, tok = seq.params, seq.tokens[-1]
        if not p.ignore_eos and tok in self.eos_ids:
            return self._finish(seq, "stop", tok)
        if tok in p.stop_token_ids:
            return self._finish(seq, "stop", tok)
        if p.stop:
            text = self._decode(seq.tokens)
            for s in p.stop:
                if s in text:
                    return self._finish(seq, "stop", s)
        if len(seq.tokens) >= p.max_tokens or seq.length >= self.max_model_len:
            return self._finish(seq, "length")

    def _finish(self, seq: _Seq, reason: str, stop_reason: str | int | None = None) -> None:
        self._release(seq)
        if seq in self._running:
            self._running.remove(seq)
        elif seq in self._waiting:
            self._waiting.remove(seq)
        text = None
        if self.tokenizer is not None:
            text = self._decode(seq.tokens)
            if isinstance(stop_reason, str):
                text = text[: text.find(stop_reason)]
        result = GenerationResult(
            request_id=seq.req.request_id, prompt_token_ids=seq.req.prompt_token_ids, token_ids=seq.tokens,
            logprobs=seq.logprobs, token_versions=seq.versions, finish_reason=reason, stop_reason=stop_reason,
            text=text, routes=routes_from_passes(seq.routes, len(seq.context), self.num_experts),
        )
        if not seq.future.done():
            seq.future.set_result(result)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def _to_host(tokens: torch.Tensor | None, logprobs: torch.Tensor | None, routes: torch.Tensor | None,
             route_dtype: torch.dtype) -> tuple[torch.Tensor | None, ...]:
    """Copy a step's results to the host together: one synchronisation instead of one per tensor."""
    tensors = [tokens, logprobs, None if routes is None else routes.to(route_dtype)]
    present = [t for t in tensors if t is not None]
    if not present or not present[0].is_cuda:
        return tuple(tensors)
    host = [None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for h, t in zip(host, tensors):
        if t is not None:
            h.copy_(t, non_blocking=True)
    torch.cuda.current_stream().synchronize()
    return tuple(host)


def load_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy a full or partial state dict (HF names) into `model` in place; unknown names or
    mismatched shapes are an error naming them, and nothing is copied then."""
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    unknown = sorted(set(state_dict) - set(params))
    if unknown:
        raise KeyError(f"update_weights: unknown tensor names {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    bad = [f"{k}: got {tuple(v.shape)}, model has {tuple(params[k].shape)}"
           for k, v in state_dict.items() if tuple(v.shape) != tuple(params[k].shape)]
    if bad:
        raise ValueError("update_weights: mis-shaped tensors: " + "; ".join(bad[:8]))
    with torch.no_grad():
        for k, v in state_dict.items():
            params[k].copy_(v.to(device=params[k].device, dtype=params[k].dtype))
