"""The inference cache of a Ring-2.6 policy, and how rollout engines step the model through it.

Ring-2.6 mixes two kinds of attention layer, so a sequence's cache has two parts:

* every MLA layer keeps a *paged latent cache*: per token `kv_lora_rank + qk_rope_head_dim`
  (512 + 64 = 576) values — the normalised `c_kv` followed by the roped `k_rope` — in blocks of
  `block_size` tokens. All MLA layers share one block table per sequence (a token sits at the same
  block/offset in every layer), so a sequence owns a list of block ids, not one per layer.
* every Lightning layer keeps a fixed-size recurrent state `[H, K, V]` per sequence, held in
  a *slot pool* `[max_seqs, H, K, V]`: fp32, or bf16 storage by choice (`state_dtype`; the steps
  still compute in fp32). The state cannot be rolled back: a cached sequence only
  grows, and the way to "rewind" is to free it and prefill again.

A sequence is identified by its *slot* (an int in `[0, max_seqs)`), which indexes the Lightning
state pools and the block-table rows alike.

Usage (what `kpop/rollout/` codes against)::

    cache = HybridCache.for_model(model, max_seqs=32, num_blocks=512, block_size=16)
    a, b = cache.allocate(), cache.allocate()            # empty sequences, seq_len 0

    # batched prefill of two prompts: flat ragged ids + one length per sequence
    ids = torch.tensor(prompt_a + prompt_b)
    logits = model.forward_step(ids, [a, b], [len(prompt_a), len(prompt_b)], cache)  # [2, V] fp32
    # batched decode: one token each
    logits = model.forward_step(torch.tensor([ta, tb]), [a, b], [1, 1], cache)
    # resume a paused request / next agent turn: append several tokens (tool result +
    # next prompt) to a sequence that already has cache, mixed in one call with decodes
    logits = model.forward_step(torch.tensor(turn_ids + [tb]), [a, b], [len(turn_ids), 1], cache)
    cache.seq_len(a)                                     # tokens cached so far
    cache.free(a)                                        # slot and its blocks return to the pools

`forward_step(input_ids, slots, query_lens, cache, all_logits=False)` (on
`BailingMoeV2_5ForCausalLM`):
  - `input_ids` LongTensor `[N]`, the new tokens of every listed sequence, concatenated in the
    order of `slots`; `query_lens[i]` of them belong to `slots[i]`; `sum(query_lens) == N`,
    every length >= 1, no slot listed twice.
  - positions are implicit: token j of sequence i sits at `cache.seq_len(slots[i]) + j`.
  - returns fp32 logits for the last new token of each sequence `[len(slots), V]`, or for every
    new token `[N, V]` when `all_logits=True` (scoring several appended tokens at once).
  - afterwards every listed sequence's `seq_len` has grown by its query length. Blocks are
    taken from the pool as needed; if the pool cannot hold the new tokens, `CacheFull` is raised
    *before* anything is written, so the caller can pause/evict and retry.
  - runs under `torch.no_grad()`. Lightning layers: `lightning_decode` when every query length
    is 1, else chunked `lightning_attn` seeded with the slots' states. MLA layers: sequences with
    no cache run `mla_prefill`; tokens appended to a cache run `mla_decode` (weight-absorbed),
    one row per token, so a long append costs rows x context. The result equals a full-sequence
    `forward` up to fp rounding (tests: fp32 within 1e-5).

`can_fit(slots, query_lens)` tells beforehand whether a step fits; `num_free_blocks` and
`num_free_slots` let a scheduler decide how many sequences to admit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class CacheFull(RuntimeError):
    """The block pool (or the slot pool) cannot hold what was asked; nothing was written."""


@dataclass(frozen=True)
class CacheShape:
    """What a model needs cached; derived from the config by `HybridCache.for_model`."""

    num_mla_layers: int
    num_linear_layers: int
    latent_dim: int  # kv_lora_rank + qk_rope_head_dim: one cached row per token per MLA layer
    linear_heads: int
    linear_head_dim: int


STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def lightning_state_dtype(value: str | torch.dtype) -> torch.dtype:
    """The storage dtype of the Lightning states from its name or torch dtype: float32 (the default)
    or bfloat16; anything else is refused by name."""
    for name, dtype in STATE_DTYPES.items():
        if value == name or value is dtype:
            return dtype
    raise ValueError(f"lightning_state_dtype must be 'float32' or 'bfloat16' (storage of the Lightning recurrent "
                     f"states), got {value!r}")


class HybridCache:
    """Paged MLA latent caches + Lightning state slot pools (fp32 or bf16) for up to `max_seqs` sequences."""

    def __init__(
        self,
        shape: CacheShape,
        max_seqs: int,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        max_seq_len: int | None = None,
        state_dtype: str | torch.dtype = torch.float32,
    ) -> None:
        if max_seqs < 1 or num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"HybridCache needs max_seqs, num_blocks and block_size >= 1, got {max_seqs}, {num_blocks}, {block_size}"
            )
        self.shape, self.max_seqs, self.num_blocks, self.block_size = shape, max_seqs, num_blocks, block_size
        self.device = torch.device(device)
        # The latent cache follows the model dtype. Lightning states are fp32 by default: a state is
        # a sum over the whole sequence, and the learner recomputes it in fp32. bf16 storage halves
        # a decode step's largest traffic (at batch 256 every step reads and writes every state) at
        # the price of one bf16 rounding of the state per step; every kernel still adds in fp32.
        self.state_dtype = lightning_state_dtype(state_dtype)
        # One spare block and one spare slot past the pools (`scratch_block`, `scratch_slot`): rows
        # that pad a batch up to a captured CUDA-graph size write there, never into a sequence's cache.
        self.kv = [
            torch.zeros(num_blocks + 1, block_size, shape.latent_dim, dtype=dtype, device=self.device)
            for _ in range(shape.num_mla_layers)
        ]
        self.state = [
            torch.zeros(
                max_seqs + 1, shape.linear_heads, shape.linear_head_dim, shape.linear_head_dim,
                dtype=self.state_dtype, device=self.device,
            )
            for _ in range(shape.num_linear_layers)
        ]
        self.scratch_slot, self.scratch_block = max_seqs, num_blocks
        # Block tables live on the device, one row per slot, and grow in place (`flush`): a decode
        # step gathers its rows there instead of copying every table from the host each step.
        self.max_blocks_per_seq = -(-(max_seq_len or num_blocks * block_size) // block_size)
        self.tables = torch.full((max_seqs + 1, self.max_blocks_per_seq), num_blocks, dtype=torch.int32, device=self.device)
        self._pending: list[tuple[int, int, int]] = []  # (slot, index, block) not yet in `tables`
        self._free_slots = list(range(max_seqs - 1, -1, -1))
        self._free_blocks = list(range(num_blocks - 1, -1, -1))
        self._blocks: dict[int, list[int]] = {}
        self._len: dict[int, int] = {}

    @classmethod
    def for_model(cls, model: torch.nn.Module, max_seqs: int, num_blocks: int, block_size: int = 16,
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                  max_seq_len: int | None = None, state_dtype: str | torch.dtype = torch.float32) -> "HybridCache":
        """A cache shaped for `model` (a `BailingMoeV2_5ForCausalLM`), on its device and dtype."""
        p = next(model.parameters())
        return cls(model.cache_shape(), max_seqs, num_blocks, block_size,
                   dtype=dtype or p.dtype, device=device or p.device, max_seq_len=max_seq_len,
                   state_dtype=state_dtype)

    # -- sequence bookkeeping -------------------------------------------------------------
    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    def allocate(self) -> int:
        """A fresh, empty sequence slot (its Lightning states are zeroed)."""
        if not self._free_slots:
            raise CacheFull(f"all {self.max_seqs} sequence slots are in use")
        slot = self._free_slots.pop()
        for s in self.state:
            s[slot].zero_()
        self._blocks[slot], self._len[slot] = [], 0
        return slot

    def free(self, slot: int) -> None:
        self._check(slot)
        self._free_blocks.extend(reversed(self._blocks.pop(slot)))
        del self._len[slot]
        self._free_slots.append(slot)

    def seq_len(self, slot: int) -> int:
        self._check(slot)
        return self._len[slot]

    def active_slots(self) -> list[int]:
        return sorted(self._len)

    def _check(self, slot: int) -> None:
        if slot not in self._len:
            raise KeyError(f"sequence slot {slot} is not allocated")

    def _blocks_needed(self, slot: int, n: int) -> int:
        have = len(self._blocks[slot])
        return max(0, -(-(self._len[slot] + n) // self.block_size) - have)

    def can_fit(self, slots: list[int], query_lens: list[int]) -> bool:
        if not self.shape.num_mla_layers:
            return True
        lens, blocks, bs = self._len, self._blocks, self.block_size
        need = sum(max(0, -(-(lens[s] + n) // bs) - len(blocks[s])) for s, n in zip(slots, query_lens))
        return need <= len(self._free_blocks)

    def reserve(self, slots: list[int], query_lens: list[int]) -> None:
        """Grow the block tables to hold `query_lens` more tokens; all-or-nothing."""
        if len(slots) != len(query_lens):
            raise ValueError(f"{len(slots)} slots but {len(query_lens)} query lengths")
        if len(set(slots)) != len(slots):
            raise ValueError(f"a slot is listed twice in {slots}")
        lens, blocks, bs, cap = self._len, self._blocks, self.block_size, self.max_blocks_per_seq * self.block_size
        for s, n in zip(slots, query_lens):
            if s not in lens:
                raise KeyError(f"sequence slot {s} is not allocated")
            if n < 1:
                raise ValueError(f"query length for slot {s} must be >= 1, got {n}")
        if not self.shape.num_mla_layers:
            return
        # one pass for the needs (this runs every step for every sequence)
        needs = [max(0, -(-(lens[s] + n) // bs) - len(blocks[s])) for s, n in zip(slots, query_lens)]
        if sum(needs) > len(self._free_blocks):
            raise CacheFull(f"step needs {sum(needs)} more blocks of {bs} tokens, {self.num_free_blocks} free")
        for s, n in zip(slots, query_lens):
            if lens[s] + n > cap:
                raise CacheFull(f"slot {s} would hold {lens[s] + n} tokens, over max_seq_len {cap}")
        for s, k in zip(slots, needs):
            for _ in range(k):
                blocks[s].append(self._free_blocks.pop())
                self._pending.append((s, len(blocks[s]) - 1, blocks[s][-1]))

    def flush(self) -> None:
        """Write the block-table entries added since the last flush into `tables` (one host-to-device
        copy, no sync); `forward_step` calls it before reading the tables."""
        if self._pending:
            upd = torch.tensor(self._pending, dtype=torch.int32).to(self.device, non_blocking=True).long()
            self.tables[upd[:, 0], upd[:, 1]] = upd[:, 2].int()
            self._pending = []

    def fork(self, src: int, dst: int) -> None:
        """Give the empty sequence `dst` a copy of `src`'s cache (its Lightning states and its MLA
        rows, block by block): `dst` then continues as if it had been fed `src`'s tokens. A group of
        samples of one prompt prefills it once and forks (copying 576 values per token per MLA
        layer is far cheaper than recomputing them)."""
        self._check(src)
        self._check(dst)
        if self._len[dst]:
            raise ValueError(f"fork: slot {dst} already holds {self._len[dst]} tokens")
        n = self._len[src]
        if n:
            self.reserve([dst], [n])
        for s in self.state:
            s[dst] = s[src]
        if n and self.shape.num_mla_layers:
            k = len(self._blocks[dst])
            idx = torch.tensor([self._blocks[src][:k], self._blocks[dst]], dtype=torch.long).to(self.device, non_blocking=True)
            for kv in self.kv:
                kv[idx[1]] = kv[idx[0]]
        self._len[dst] = n

    def advance(self, slots: list[int], query_lens: list[int]) -> None:
        for s, n in zip(slots, query_lens):
            self._len[s] += n

    def block_table(self, slots: list[int]) -> torch.Tensor:
        """int32 `[len(slots), max_blocks]`, padded with the scratch block (never read past `seq_lens`)."""
        self.flush()
        width = max(1, max((len(self._blocks[s]) for s in slots), default=1))
        return self.tables[torch.tensor(slots, dtype=torch.long).to(self.device, non_blocking=True), :width]

    def num_blocks_of(self, slot: int) -> int:
        return len(self._blocks[slot])

    def token_locations(self, slots: list[int], query_lens: list[int]) -> torch.Tensor:
        """Flat cache row (`block * block_size + offset`) of every new token, int64 `[N]`."""
        return self.host_locations(slots, query_lens).to(self.device)

    def host_locations(self, slots: list[int], query_lens: list[int]) -> torch.Tensor:
        """`token_locations` on the host (the step context packs it with the rest into one copy)."""
        bs = self.block_size
        if not self.shape.num_mla_layers:  # nothing is cached by position
            return torch.zeros(sum(query_lens), dtype=torch.long)
        if all(n == 1 for n in query_lens):  # a decode step: one row each, no tensor per sequence
            return torch.tensor([self._blocks[s][self._len[s] // bs] * bs + self._len[s] % bs for s in slots],
                                dtype=torch.long)
        rows = []
        for s, n in zip(slots, query_lens):
            pos = torch.arange(self._len[s], self._len[s] + n)
            blocks = torch.tensor(self._blocks[s], dtype=torch.long)[pos // bs]
            rows.append(blocks * bs + pos % bs)
        return torch.cat(rows)
