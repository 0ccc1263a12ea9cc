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
* Overlap: a decode step is launched before the previous one's tokens reach the host. When every
  running sequence decoded in the last step and nothing waits to be admitted, the next step feeds
  the tokens the last one sampled straight from the device, and the host reads the last step back
  (stop checks, bookkeeping) while the GPU runs the next. A sequence that stopped (eos, stop
  string) in the step being read back has one row of the step in flight computed for nothing; that
  row is dropped (`stats["discarded_rows"]`). Anything else (admission, prefill, preemption,
  abort, a weight update) first reads the step in flight back.
* Routing replay (MoE policies): every token fed through the model records its experts per MoE
  layer; a token fed again (re-prefill) keeps the route of its last pass, the one the tokens
  sampled after it saw. The result's `routes` cover prompt + generated tokens.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from kpop.policy.cache import CacheFull, HybridCache
from kpop.rollout.engine import EngineError, GenerationRequest, GenerationResult, SamplingParams, ThreadedEngine
from kpop.rollout.routes import routes_from_passes
from kpop.rollout.sampling import SamplingBatch, sample


@dataclass(eq=False)  # identity: `in` / `remove` on the running list must not compare fields
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
    routes: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (first position, ids [n, layers, k]) per pass
    done: bool = False  # finished: a row of it still in flight is dropped

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


@dataclass
class _Launched:
    """A decode step on its way: launched, its tokens not read back yet."""

    seqs: list[_Seq]  # one row each, in order
    positions: list[int]  # the position each row fed (its route's place)
    tokens: torch.Tensor  # [rows] sampled, on the device: the next step's input when it chains
    host: tuple[torch.Tensor | None, ...]  # (tokens, logprobs, routes) landing in host memory
    ready: Any  # a CUDA event recorded after the copies (None on CPU: the copies are done)
    version: int  # the weights that sampled them


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
        overlap: bool = True,  # launch a decode step before reading the previous one back
        # storage of the Lightning recurrent states: "bfloat16" halves a decode step's state traffic
        # (the largest at big batches) at one bf16 rounding per state per step; the arithmetic stays
        # fp32. The learner recomputes in fp32, so logprobs drift a little further from its own.
        lightning_state_dtype: str | torch.dtype = "float32",
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
                                           max_seq_len=max_model_len, state_dtype=lightning_state_dtype)
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
        self.overlap = overlap
        self._inflight: _Launched | None = None
        self._leaders: dict[tuple[int, ...], _Seq] = {}  # prompt -> the admitted request prefilling it
        self.num_experts = int(model.config.num_experts or 0)
        # steps, prefill_tokens, decode_tokens, preemptions, reprefills, forks, prefill_tokens_saved,
        # chained_steps, discarded_rows (decode steps fed from the device; rows of sequences that
        # had stopped: see Overlap above), and where the scheduler thread's time goes: wait_s
        # (blocked on a decode step's results), finish_s (assembling finished requests)
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
        self._land()
        for seq in [s for s in [*self._running, *self._waiting] if s.req.request_id == request_id]:
            self._finish(seq, "abort")

    def _has_work(self) -> bool:
        return bool(self._running or self._waiting or self._inflight)

    def _load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self._land()  # its tokens were sampled by the old weights and say so
        load_into(self.model, state_dict)
        for seq in sorted(self._running, key=lambda s: s.order, reverse=True):
            self._evict(seq)
            self.stats["reprefills"] += 1

    def _fail_all(self, exc: EngineError) -> None:
        self._inflight = None
        for seq in [*self._running, *self._waiting]:
            self._release(seq)
            if not seq.future.done():
                seq.future.set_exception(exc)
        self._running, self._waiting = [], collections.deque()

    # -- one step -------------------------------------------------------------------------------
    def _step(self) -> None:
        """Admit waiting requests, run one forward over every running sequence, sample. A decode
        step is left in flight; the next call chains the following decode step to it, or reads it
        back first (see Overlap in the module docstring)."""
        last, self._inflight = self._inflight, None
        if last is not None:
            keep = self._chain(last)
            if keep:
                tokens = last.tokens
                if len(keep) < len(last.seqs):
                    tokens = tokens[torch.tensor(keep).to(tokens.device, non_blocking=True)]
                self._inflight = self._launch_decode([last.seqs[i] for i in keep], tokens, ahead=1)
                self.stats["chained_steps"] += 1
            self._read_back(last)
            if self._inflight is not None:
                return
        self._admit()
        batch = self._plan()
        if not batch:
            return
        if all(n == 1 and 0 < s.cached == s.length - 1 and s.prefix_key is None for s, n in batch):  # a decode step
            self._inflight = self._launch_decode([s for s, _ in batch], [s.feed(1)[0] for s, _ in batch])
            if not self.overlap:
                self._land()
            return
        slots = [s.slot for s, _ in batch]
        lens = [n for _, n in batch]
        ids = [t for s, n in batch for t in s.feed(n)]
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
            # copied asynchronously: torch.tensor(..., device=cuda) would wait for the device to drain
            rows = logits if same else logits[torch.tensor(ready).to(logits.device, non_blocking=True)]
            tokens, logprobs = sample(rows, sb)
        # one read back per step: the sampled tokens, their logprobs and the routes
        host, ready = self._to_host(tokens if seqs else None, logprobs if seqs else None, routes)
        if ready is not None:
            ready.synchronize()
        tokens, logprobs, routes = host
        routes = None if routes is None else routes.numpy()  # numpy rows: see _read_back
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

    def _chain(self, last: _Launched) -> list[int]:
        """The rows of `last` whose sequences the next step can decode from its device tokens,
        unread: those that its token does not stop by length; none unless `last` holds every
        running sequence, no waiting request could be admitted now and the cache holds one more
        token each."""
        if len(last.seqs) != len(self._running) or self._admissible():
            return []
        keep = [i for i, s in enumerate(last.seqs)
                if len(s.tokens) + 1 < s.params.max_tokens and s.length + 1 < self.max_model_len]
        if not self.cache.can_fit([last.seqs[i].slot for i in keep], [1] * len(keep)):
            return []
        return keep

    def _launch_decode(self, seqs: list[_Seq], ids: list[int] | torch.Tensor, ahead: int = 0) -> _Launched:
        """Feed each sequence one token (`ids`: host ids, or the device tokens of the step in
        flight, whose `ahead` = 1 tokens are not in `seq.tokens` yet), sample, and start copying
        the results to the host; nothing waits for the device."""
        slots = [s.slot for s in seqs]
        positions = [s.cached for s in seqs]
        if self.graphs is not None:
            logits, routes = self._graph_decode(ids, slots)
        else:
            if not isinstance(ids, torch.Tensor):
                ids = torch.tensor(ids).to(self.cache.device, non_blocking=True)
            logits, routes = self.model.forward_step(ids, slots, [1] * len(seqs), self.cache, return_expert_ids=True)
        sb = SamplingBatch.of([s.params for s in seqs], [s.seed for s in seqs],
                              [len(s.tokens) + ahead for s in seqs], logits.device)
        tokens, logprobs = sample(logits, sb)
        for s in seqs:
            s.cached += 1
        self.stats["steps"] += 1
        self.stats["decode_tokens"] += len(seqs)
        host, ready = self._to_host(tokens, logprobs, routes)
        return _Launched(seqs, positions, tokens, host, ready, self._version)

    def _read_back(self, step: _Launched) -> None:
        """Wait for `step`'s results on the host and apply them: tokens, logprobs, routes, stops."""
        if step.ready is not None:
            t0 = time.perf_counter()
            step.ready.synchronize()
            self.stats["wait_s"] += time.perf_counter() - t0
        tokens, logprobs, routes = step.host
        # numpy views: a torch slice per row costs microseconds, and routes_from_passes reads numpy
        rows = routes.numpy() if routes is not None else None
        for i, (seq, tok, lp) in enumerate(zip(step.seqs, tokens.tolist(), logprobs.tolist())):
            if seq.done:  # stopped while this row was in flight
                self.stats["discarded_rows"] += 1
                continue
            if rows is not None:
                seq.routes.append((step.positions[i], rows[i : i + 1]))
            seq.tokens.append(tok)
            seq.length += 1
            seq.logprobs.append(lp)
            seq.versions.append(step.version)
            self._check_stop(seq)

    def _land(self) -> None:
        """Read the step in flight back (before anything changes the requests or the weights)."""
        if self._inflight is not None:
            last, self._inflight = self._inflight, None
            self._read_back(last)

    def _to_host(self, tokens: torch.Tensor | None, logprobs: torch.Tensor | None,
                 routes: torch.Tensor | None) -> tuple[tuple[torch.Tensor | None, ...], Any]:
        """Start copying a step's results to pinned host memory together (one wait for all of
        them, not one per tensor): (host tensors, an event to wait on; None on CPU)."""
        if routes is not None:
            routes = routes.to(torch.uint8 if self.num_experts <= 256 else torch.int32)
        tensors = (tokens, logprobs, routes)
        if self.cache.device.type != "cuda":
            return tensors, None
        host = tuple(None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors)
        for h, t in zip(host, tensors):
            if t is not None:
                h.copy_(t, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return host, ready

    def _graph_decode(self, ids: list[int] | torch.Tensor, slots: list[int]):
        try:
            return self.graphs.decode(ids, slots)
        except torch.cuda.CudaError:
            raise
        except Exception as exc:  # capture refused (an op that syncs): step eagerly from now on
            import warnings

            warnings.warn(f"CUDA-graph decode off, stepping eagerly: {type(exc).__name__}: {exc}", stacklevel=2)
            self.stats["graph_failures"] += 1
            self.graphs = None
            if not isinstance(ids, torch.Tensor):
                ids = torch.tensor(ids).to(self.cache.device)
            return self.model.forward_step(ids, slots, [1] * len(slots), self.cache, return_expert_ids=True)

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

    def _admissible(self) -> bool:
        """Whether the first waiting request can be admitted now: a free slot, and a block of
        headroom per running sequence beside its own (or the newcomer is preempted at once)."""
        if not (self._waiting and self.cache.num_free_slots):
            return False
        need = -(-self._waiting[0].length // self.cache.block_size) + len(self._running)
        return not self._running or need <= self.cache.num_free_blocks

    def _admit(self) -> None:
        while self._admissible():
            seq = self._waiting.popleft()
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
        t0 = time.perf_counter()
        seq.done = True
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
        self.stats["finish_s"] += time.perf_counter() - t0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


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
