"""Ring-2.6 / Ling-2.6: HF `BailingMoeV2_5ForCausalLM` (`model_type: bailing_hybrid`) in one file.

Read top to bottom: norms and RoPE, the two attention mixers (Lightning linear attention and
MLA), the MoE, the decoder and MTP layers, then the causal LM with its two entry points:

* `forward(input_ids [B,T], position_ids=None, cu_seqlens=None, labels=None)` — training and
  scoring. With `cu_seqlens` (int32 `[N+1]`) the batch is `B == 1` packed sequences whose
  positions restart at every boundary; attention never crosses a boundary.
* `forward_step(input_ids [N], slots, query_lens, cache)` — inference through a `HybridCache`
  (kpop/policy/cache.py explains the contract): batched prefill, batched decode, and appending
  several tokens to a sequence that already has cache.

Every attention op goes through `kernels/` (Triton on GPU, pure-torch references on CPU), so
rollout and training run the same math. Parameter and buffer names match the HF checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from kernels.lightning import lightning_attn, lightning_decode
from kernels.linear import linear_fp32
from kernels.mla import mla_cache_write, mla_decode, mla_prefill
from kernels.moe import moe_ffn
from kernels.norm import rms_norm
from kernels.rope import apply_rope
from kernels.router import expert_weights, group_limited_topk, route
from kpop.policy.cache import CacheShape, HybridCache
from kpop.policy.config import BailingHybridConfig

# -- norms ---------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm, statistics in fp32 (kernels/norm: a fused kernel for CUDA inference, torch otherwise)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GroupRMSNorm(nn.Module):
    """RMSNorm over `groups` equal slices of the last dim, one weight over the whole dim."""

    def __init__(self, dim: int, groups: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.groups, self.eps = groups, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.groups)


# -- rotary embeddings -------------------------------------------------------------------------


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(dim: int, base: float, rope_scaling: dict | None) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2], cos/sin scale) for default RoPE or YaRN (DeepSeek-V2 formulation)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    kind = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq.float(), 1.0
    if kind != "yarn":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (use 'yarn' or none)")
    factor = float(rope_scaling["factor"])
    orig = rope_scaling.get("original_max_position_embeddings", 131072)
    beta_fast, beta_slow = rope_scaling.get("beta_fast", 32), rope_scaling.get("beta_slow", 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)  # interpolate low freqs, keep high
    mscale, mscale_all = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
    if mscale and mscale_all:
        attn = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
    else:
        attn = _yarn_mscale(factor)
    return inv_freq.float(), attn


class Rotary(nn.Module):
    """cos/sin tables `[..., dim]` (frequencies repeated twice, NeoX layout) for integer positions,
    which `apply_rope` (kernels/rope) applies to q and k."""

    def __init__(self, dim: int, base: float, rope_scaling: dict | None) -> None:
        super().__init__()
        self.dim, self.base, self.rope_scaling = dim, base, rope_scaling
        self.register_buffer("inv_freq", torch.empty(dim // 2), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        inv_freq, self.scale = rope_frequencies(self.dim, self.base, self.rope_scaling)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq.float()
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * self.scale, emb.sin() * self.scale


# -- attention: Lightning ---------------------------------------------------------------------


def alibi_slopes(n: int) -> list[float]:
    if math.log2(n).is_integer():
        start = 2 ** (-8 / n)
        return [start ** (h + 1) for h in range(n)]
    p = 2 ** math.floor(math.log2(n))
    return alibi_slopes(p) + alibi_slopes(2 * p)[0::2][: n - p]


@dataclass
class StepContext:
    """Per-call layout of a `forward_step`, shared by every layer (N new tokens, S sequences)."""

    slots: torch.Tensor  # int64 [S]
    query_lens: list[int]
    cu_seqlens: torch.Tensor | None  # int32 [S+1] over the new tokens (None in a decode step)
    locations: torch.Tensor  # int64 [N]: flat latent-cache row of each new token
    fresh_tokens: torch.Tensor | None  # int64: tokens of sequences that had no cache (plain prefill)
    fresh_cu_seqlens: torch.Tensor | None  # int32: cu_seqlens over those tokens
    cached_tokens: torch.Tensor | None  # int64: tokens appended to existing cache (absorbed decode rows)
    cached_block_table: torch.Tensor  # int32 [len(cached_tokens), max_blocks]: each row's sequence table
    cached_seq_lens: torch.Tensor  # int32 [len(cached_tokens)]: context seen by each row, incl. itself
    # a decode step (every sequence cached, one new token each): every token is a cached row in
    # order, so no index lists are needed; its shapes depend on the batch size alone (CUDA graphs)
    decode: bool = False
    last_tokens: torch.Tensor | None = None  # int64 [S]: each sequence's last new token (None: decode)
    # the longest fresh sequence's new tokens, known on the host: the prefill kernel's grid size
    # would otherwise be read back from fresh_cu_seqlens on the device (a host sync per MLA layer)
    fresh_max_len: int | None = None


class LightningAttention(nn.Module):
    """Linear attention with a constant per-head decay (simple GLA), QK-norm, partial RoPE,
    group RMSNorm and a sigmoid output gate."""

    def __init__(self, config: BailingHybridConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.config = config
        H, D = self.num_heads, self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * H * D, bias=config.use_qkv_bias)
        if config.use_qk_norm:
            self.query_layernorm = RMSNorm(D, config.rms_norm_eps)
            self.key_layernorm = RMSNorm(D, config.rms_norm_eps)
        self.g_proj = nn.Linear(config.hidden_size, H * D, bias=False)
        self.g_norm = GroupRMSNorm(H * D, config.group_norm_size, config.rms_norm_eps)
        self.dense = nn.Linear(H * D, config.hidden_size, bias=config.use_bias)
        self.register_buffer("g_gamma", torch.empty(H), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        c, L = self.config, self.config.num_hidden_layers
        factor = 1 - (self.layer_idx - c.linear_decay_offset) / max(L - 1, 1) + 1e-5
        slopes = torch.tensor(alibi_slopes(self.num_heads), dtype=torch.float32)
        self.g_gamma = (-slopes * factor).to(self.g_gamma.device)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        q, k, v = self.query_key_value(x).unflatten(-1, (3 * self.num_heads, self.head_dim)).chunk(3, dim=-2)
        if self.config.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _out(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        o = self.g_norm(o.flatten(-2).to(x.dtype))
        return self.dense(o * torch.sigmoid(self.g_proj(x)))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor | None):
        q, k, v = self._qkv(x, cos, sin)
        o, _ = lightning_attn(q, k, v, self.g_gamma, cu_seqlens=cu_seqlens)
        return self._out(o, x)

    def step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: StepContext, state: torch.Tensor):
        q, k, v = self._qkv(x, cos, sin)  # [N, H, D]
        if ctx.decode or all(n == 1 for n in ctx.query_lens):
            o = lightning_decode(q, k, v, self.g_gamma, state, state_slots=ctx.slots)
        else:
            o, final = lightning_attn(
                q[None], k[None], v[None], self.g_gamma,
                initial_state=state[ctx.slots], output_final_state=True, cu_seqlens=ctx.cu_seqlens,
            )
            state[ctx.slots] = final.to(state.dtype)  # a bf16 pool rounds the fp32 final state once
            o = o[0]
        return self._out(o, x)


# -- attention: MLA -------------------------------------------------------------------------------


class MultiLatentAttention(nn.Module):
    """DeepSeek-V2 MLA. Training/prefill decompress the latent to per-head K/V; decode absorbs
    `kv_b_proj` into the query and output so attention runs over the 576-dim latent cache."""

    def __init__(self, config: BailingHybridConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx, self.config = layer_idx, config
        self.num_heads = config.num_attention_heads
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.rank = config.kv_lora_rank
        H, Dqk = self.num_heads, self.nope + self.rope
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, H * Dqk, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=config.use_qkv_bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * Dqk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, self.rank + self.rope, bias=config.use_qkv_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.rank, H * (self.nope + self.v_dim), bias=False)
        self.dense = nn.Linear(H * self.v_dim, config.hidden_size, bias=config.use_qkv_bias)
        self.scale = Dqk**-0.5
        rs = config.rope_scaling
        if rs and rs.get("mscale_all_dim"):
            self.scale *= _yarn_mscale(float(rs["factor"]), rs["mscale_all_dim"]) ** 2

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """-> q_nope [...,H,nope], q_rope [...,H,rope], c_kv (normed) [...,rank], k_rope [...,rope]."""
        if self.config.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.unflatten(-1, (self.num_heads, -1)).split([self.nope, self.rope], dim=-1)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        interleaved = self.config.rope_interleave
        q_rope = apply_rope(q_rope, cos, sin, interleaved)
        k_rope = apply_rope(k_rope.unsqueeze(-2), cos, sin, interleaved).squeeze(-2)
        return q_nope, q_rope, self.kv_a_layernorm(c_kv), k_rope

    def _attend_full(self, q_nope, q_rope, c_kv, k_rope, cu_seqlens, max_seqlen: int | None = None):
        k_nope, v = self.kv_b_proj(c_kv).unflatten(-1, (self.num_heads, -1)).split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(-2).expand(*k_nope.shape[:-1], self.rope)], dim=-1)
        return mla_prefill(q, k, v, self.scale, cu_seqlens=cu_seqlens, causal=True, max_seqlen=max_seqlen)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor | None):
        o = self._attend_full(*self._project(x, cos, sin), cu_seqlens)
        return self.dense(o.flatten(-2))

    def step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: StepContext, kv: torch.Tensor):
        q_nope, q_rope, c_kv, k_rope = self._project(x, cos, sin)  # x [N, D]
        if ctx.decode:  # every location is valid: a plain scatter, no mask (a mask is a host sync)
            kv.view(-1, kv.shape[-1]).index_copy_(0, ctx.locations, torch.cat([c_kv, k_rope], dim=-1).to(kv.dtype))
            w = self.kv_b_proj.weight.unflatten(0, (self.num_heads, self.nope + self.v_dim))
            w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]
            q = torch.cat([torch.einsum("nhd,hdr->nhr", q_nope, w_uk), q_rope], dim=-1)
            o_lat = mla_decode(q, kv, ctx.cached_block_table, ctx.cached_seq_lens, self.scale, v_dim=self.rank)
            out = torch.einsum("nhr,hvr->nhv", o_lat.to(w.dtype), w_uv).to(x.dtype)
            return self.dense(out.flatten(-2))
        mla_cache_write(kv, torch.cat([c_kv, k_rope], dim=-1), ctx.locations)
        out = x.new_empty(x.shape[0], self.num_heads, self.v_dim)
        if ctx.fresh_tokens.numel():  # sequences without cache: ordinary causal prefill
            i = ctx.fresh_tokens
            o = self._attend_full(q_nope[i][None], q_rope[i][None], c_kv[i][None], k_rope[i][None], ctx.fresh_cu_seqlens,
                                  ctx.fresh_max_len)
            out[i] = o[0].to(out.dtype)
        if ctx.cached_tokens.numel():  # after existing cache: one absorbed decode row per token
            i = ctx.cached_tokens
            w = self.kv_b_proj.weight.unflatten(0, (self.num_heads, self.nope + self.v_dim))
            w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]  # [H, nope, rank], [H, v, rank]
            q = torch.cat([torch.einsum("nhd,hdr->nhr", q_nope[i], w_uk), q_rope[i]], dim=-1)
            o_lat = mla_decode(q, kv, ctx.cached_block_table, ctx.cached_seq_lens, self.scale, v_dim=self.rank)
            out[i] = torch.einsum("nhr,hvr->nhv", o_lat.to(w.dtype), w_uv).to(out.dtype)
        return self.dense(out.flatten(-2))


# -- feed-forward ----------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, config: BailingHybridConfig, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    """fp32 sigmoid router; `expert_bias` (a buffer, moved by load balancing, never by gradient)
    only steers *which* experts are chosen; the weights are the unbiased scores.

    In training mode the gate also counts the rows routed to each expert (`expert_load`, int64,
    not saved) for the aux-loss-free bias update; `count_load = False` pauses counting (the
    learner sets it while activation checkpointing recomputes a layer, which routes again)."""

    def __init__(self, config: BailingHybridConfig) -> None:
        super().__init__()
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.num_experts = config.num_experts
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))
        self.register_buffer("expert_load", torch.zeros(config.num_experts, dtype=torch.long), persistent=False)
        self.count_load = True

    def reset_buffers(self) -> None:
        """Buffers no checkpoint holds (`expert_bias` is loaded, so it is left alone here)."""
        self.expert_load.zero_()

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (expert ids [N, k], fp32 weights [N, k]). With `expert_ids` (routing replay)
        those experts are used, weighted by the router's own scores at them, so the router still
        learns; the choice itself is then not the router's."""
        logits = F.linear(x.float(), self.weight.float())
        if expert_ids is None:  # the router's own choice (one fused kernel in CUDA inference)
            idx, w = route(logits, self.expert_bias, self.n_group, self.topk_group, self.top_k, self.scaling)
        else:  # rows of -1 (a token with no recorded route) fall back to this router's choice
            scores = torch.sigmoid(logits)
            idx = expert_ids.long()
            free = idx[:, 0] < 0
            if bool(free.any()):
                idx = torch.where(free[:, None], self.select(scores), idx)
            w = expert_weights(scores, idx, self.scaling)
        if self.training and self.count_load:  # replayed experts count: they are the load the rollout put on them
            self.expert_load.scatter_add_(0, idx.reshape(-1), torch.ones_like(idx.reshape(-1)))
        return idx, w

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Group-limited top-k over the biased scores: the best `topk_group` groups by the sum of
        their top-2, then the top `k` experts inside them."""
        return group_limited_topk(scores, self.expert_bias, self.n_group, self.topk_group, self.top_k)

    def check_expert_ids(self, expert_ids: torch.Tensor, n: int) -> None:
        """Forced ids come from outside (a stored trajectory): name what is wrong with them."""
        if expert_ids.shape != (n, self.top_k) or expert_ids.is_floating_point():
            raise ValueError(
                f"expert_ids must be an integer [tokens={n}, top_k={self.top_k}] tensor, "
                f"got {expert_ids.dtype} {tuple(expert_ids.shape)}"
            )
        # a row is either a route (every id in range) or all -1 (no route: the router decides)
        ok = ((expert_ids >= 0) & (expert_ids < self.num_experts)).all(-1) | (expert_ids == -1).all(-1)
        if n and not bool(ok.all()):
            raise ValueError(f"expert_ids rows must lie in [0, {self.num_experts}) or be all -1 (no route), "
                             f"got values {expert_ids.min().item()}..{expert_ids.max().item()}")


def _stacked_view(ws: list[torch.Tensor]) -> torch.Tensor | None:
    """`torch.stack(ws)` without the copy when the matrices already lie back to back in one
    storage (after `SparseMoeBlock.pack_experts`), else None."""
    w0 = ws[0]
    if not w0.is_contiguous():
        return None
    step, base = w0.numel() * w0.element_size(), w0.data_ptr()
    for e, w in enumerate(ws):
        if w.data_ptr() != base + e * step or w.shape != w0.shape or w.dtype != w0.dtype or not w.is_contiguous():
            return None
    return w0.detach().as_strided((len(ws), *w0.shape), (w0.numel(), *w0.stride()))


class SparseMoeBlock(nn.Module):
    """Routed experts (one grouped kernel, kernels/moe) plus the shared expert.

    `forward(x, expert_ids=None, return_expert_ids=False)`: `expert_ids` [tokens, top_k] forces the
    routing (replay: the rollout's experts, weighted by this router's scores; an all -1 row leaves
    that token to the router); with
    `return_expert_ids` the result is `(y, ids)`, ids [tokens, top_k] int64, tokens = x's leading
    dims flattened."""

    def __init__(self, config: BailingHybridConfig) -> None:
        super().__init__()
        self.experts = nn.ModuleList(MLP(config, config.moe_intermediate_size) for _ in range(config.num_experts))
        self.gate = MoEGate(config)
        self.shared_experts = (
            MLP(config, config.moe_intermediate_size * config.num_shared_experts) if config.num_shared_experts else None
        )

    def expert_weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Per-expert (gate [I,D], up [I,D], down [D,I]) weights, as the HF `nn.Linear`s hold them.
        The grouped GEMM stacks them (E x 3 x I x D copied, ~2% of a training step at 64k tokens);
        keeping them per expert keeps parameter names, optimizer state and weight loading as every
        checkpoint and engine expects."""
        mlps = [e._modules for e in self.experts._modules.values()]  # plain dicts: no Module.__getattr__ per expert
        per_expert = tuple([m[name].weight for m in mlps] for name in ("gate_proj", "up_proj", "down_proj"))
        if torch.is_grad_enabled():  # a stacked view would route every expert's gradient to expert 0
            return per_expert
        stacked = tuple(_stacked_view(ws) for ws in per_expert)
        return per_expert if any(w is None for w in stacked) else stacked

    @torch.no_grad()
    def pack_experts(self) -> None:
        """Re-lay the experts' weights as slices of one [E, ...] tensor per projection, in place:
        the per-expert parameters keep their names and objects (checkpoints, weight updates and
        `load_state_dict` see no change) but become views, so inference hands the grouped kernel
        the stacks with no copy. A later `.to()` / `.cuda()` undoes it (each moved parameter gets
        its own storage) and `expert_weights` falls back to the per-expert lists."""
        mlps = [e._modules for e in self.experts._modules.values()]
        for name in ("gate_proj", "up_proj", "down_proj"):
            ws = [m[name].weight for m in mlps]
            stacked = torch.stack([w.detach() for w in ws])
            for e, w in enumerate(ws):
                w.data = stacked[e]

    def forward(
        self, x: torch.Tensor, expert_ids: torch.Tensor | None = None, return_expert_ids: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if expert_ids is not None:
            self.gate.check_expert_ids(expert_ids, flat.shape[0])
        idx, w = self.gate(flat, expert_ids)
        y = moe_ffn(flat, idx, w, *self.expert_weights())
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        y = y.view(shape)
        return (y, idx) if return_expert_ids else y


# -- blocks ----------------------------------------------------------------------------------


class DecoderLayer(nn.Module):
    def __init__(self, config: BailingHybridConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_mla = config.mixer_types()[layer_idx] == "attention"
        self.attention = (MultiLatentAttention if self.is_mla else LightningAttention)(config, layer_idx)
        use_moe = config.num_experts and layer_idx >= config.first_k_dense_replace
        self.mlp = SparseMoeBlock(config) if use_moe else MLP(config, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, h: torch.Tensor, rope: dict, cu_seqlens: torch.Tensor | None, expert_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (h, the MoE's expert ids [tokens, top_k], None for a dense layer); `expert_ids` replays a routing."""
        cos, sin = rope["mla" if self.is_mla else "linear"]
        h = h + self.attention(self.input_layernorm(h), cos, sin, cu_seqlens)
        return self._ffn(h, expert_ids)

    def step(
        self, h: torch.Tensor, rope: dict, ctx: StepContext, layer_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cos, sin = rope["mla" if self.is_mla else "linear"]
        h = h + self.attention.step(self.input_layernorm(h), cos, sin, ctx, layer_cache)
        return self._ffn(h, None)

    def _ffn(self, h: torch.Tensor, expert_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.post_attention_layernorm(h)
        if not isinstance(self.mlp, SparseMoeBlock):
            return h + self.mlp(x), None
        y, ids = self.mlp(x, expert_ids, return_expert_ids=True)
        return h + y, ids


class MTPLayer(nn.Module):
    """Multi-token prediction: mixes the next token's embedding into the main hidden state and
    predicts one token further. Training only (HF names: enorm, hnorm, eh_proj, final_layernorm)."""

    def __init__(self, config: BailingHybridConfig, layer_idx: int) -> None:
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = MultiLatentAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SparseMoeBlock(config) if config.num_experts else MLP(config, config.intermediate_size)
        self.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, emb: torch.Tensor, h: torch.Tensor, rope: dict, cu_seqlens: torch.Tensor | None):
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        h = h + self.attention(self.input_layernorm(h), *rope["mla"], cu_seqlens)
        h = h + self.mlp(self.post_attention_layernorm(h))
        return self.final_layernorm(h)


# -- the model -------------------------------------------------------------------------------


@dataclass
class BailingHybridOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # fp32 [B, T, V]
    mtp_logits: tuple[torch.Tensor, ...] | None = None  # k-th (0-based) at position t predicts token t+2+k
    hidden_states: torch.Tensor | None = None  # final-norm output [B, T, D]
    expert_ids: torch.Tensor | None = None  # with return_expert_ids: int64 [B*T, MoE layers, top_k]


class BailingHybridPreTrainedModel(PreTrainedModel):
    config_class = BailingHybridConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer", "MTPLayer"]
    _supports_cache_class = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, MoEGate) and getattr(module.weight, "_is_hf_initialized", False):
            # HF from_pretrained calls this for the gate because its `expert_load` buffer is not in
            # the checkpoint; the loaded router weight and bias must stay
            module.reset_buffers()
            return
        if isinstance(module, (nn.Linear, MoEGate)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, (RMSNorm, GroupRMSNorm)):
            module.weight.fill_(1.0)
        if isinstance(module, MoEGate):
            module.expert_bias.zero_()
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()


class BailingHybridModel(BailingHybridPreTrainedModel):
    def __init__(self, config: BailingHybridConfig) -> None:
        super().__init__(config)
        config.check_architecture()
        L = config.num_hidden_layers
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        # MTP layers follow the main layers in one list, as in the HF checkpoints (model.layers.{L+i})
        self.layers = nn.ModuleList(
            [DecoderLayer(config, i) for i in range(L)]
            + [MTPLayer(config, L + i) for i in range(config.num_nextn_predict_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_linear = Rotary(int(config.head_dim * config.partial_rotary_factor), config.rope_theta, config.rope_scaling)
        self.rotary_mla = Rotary(config.qk_rope_head_dim, config.rope_theta, config.rope_scaling)
        self.post_init()

    def rope(self, positions: torch.Tensor) -> dict:
        return {"linear": self.rotary_linear(positions), "mla": self.rotary_mla(positions)}


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total] positions restarting at 0 at every packed-sequence boundary."""
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lens)
    return torch.arange(total, device=cu.device) - starts


def shift_within_sequences(ids: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B,T] shifted left by one inside each sequence; (shifted, valid) with valid False where
    the next token belongs to no sequence (the last position of each)."""
    shifted = torch.roll(ids, -1, dims=-1)
    valid = torch.ones_like(ids, dtype=torch.bool)
    if cu_seqlens is None:
        valid[:, -1] = False
    else:
        valid[:, cu_seqlens[1:].long() - 1] = False
    return shifted.masked_fill(~valid, 0), valid


class BailingMoeV2_5ForCausalLM(BailingHybridPreTrainedModel, GenerationMixin):
    def __init__(self, config: BailingHybridConfig) -> None:
        super().__init__(config)
        self.model = BailingHybridModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Ring-2.6 computes the LM head in fp32 in training and inference alike (train/infer match)
        self.fp32_lm_head = bool(getattr(config, "fp32_lm_head", True))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.fp32_lm_head:
            # inference on CUDA: a bf16 tensor-core GEMM with fp32 output (the fp32 head up to
            # summation order); training and CPU: the fp32 GEMM (kernels/linear)
            return linear_fp32(h, self.lm_head.weight)
        return self.lm_head(h).float()

    def forward(
        self,
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_mtp: bool | None = None,
        return_logits: bool = True,
        expert_ids: torch.Tensor | None = None,
        return_expert_ids: bool = False,
        **kwargs,
    ) -> BailingHybridOutput:
        """Logits for every position. `labels` [B,T] (same positions as input_ids, -100 ignored)
        gives the mean next-token cross-entropy (plus `mtp_loss_scaling_factor` x MTP losses).
        MTP logits are computed when training (or `return_mtp=True`). `return_logits=False`
        leaves them to the caller (`hidden_states` + `logits()`, a chunk at a time: fp32 logits
        over a long packed batch are the learner's largest tensor).

        Routing replay: `expert_ids` int `[B*T, MoE layers, top_k]` (MoE layers of the main stack,
        in order; a row of -1 leaves that token to the router) forces each MoE layer's experts;
        `return_expert_ids` returns the ids used in `expert_ids` of the output."""
        if labels is not None and not return_logits:
            raise ValueError("labels need the logits: do not pass return_logits=False with labels")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "padding masks are not supported (a pad token would enter the Lightning state): "
                "pack sequences with cu_seqlens instead"
            )
        if kwargs.get("past_key_values") is not None:
            raise ValueError("HF past_key_values are not supported: use forward_step with a HybridCache")
        B, T = input_ids.shape
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError(f"cu_seqlens packs sequences into one row: input_ids must be [1, T], got B={B}")
            cu_seqlens = cu_seqlens.to(device=input_ids.device, dtype=torch.int32)
            if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T or bool((cu_seqlens[1:] <= cu_seqlens[:-1]).any()):
                raise ValueError(f"cu_seqlens must rise strictly from 0 to T={T}, got {cu_seqlens.tolist()}")
        if position_ids is None:
            position_ids = (
                positions_from_cu_seqlens(cu_seqlens, T)[None]
                if cu_seqlens is not None
                else torch.arange(T, device=input_ids.device)[None].expand(B, T)
            )
        m = self.model
        rope = m.rope(position_ids)
        L = self.config.num_hidden_layers
        h = m.word_embeddings(input_ids)
        moe_layers = self.moe_layers()
        if expert_ids is not None and tuple(expert_ids.shape[:2]) != (B * T, len(moe_layers)):
            raise ValueError(f"expert_ids must be [tokens={B * T}, MoE layers={len(moe_layers)}, top_k], "
                             f"got {tuple(expert_ids.shape)}")
        routes = []
        for i, layer in enumerate(m.layers[:L]):
            forced = expert_ids[:, moe_layers.index(i)] if expert_ids is not None and i in moe_layers else None
            h, ids = layer(h, rope, cu_seqlens, forced)
            if ids is not None and return_expert_ids:
                routes.append(ids)
        h = m.norm(h)
        logits = self.logits(h) if return_logits else None

        mtp_logits = None
        if m.layers[L:] and (self.training if return_mtp is None else return_mtp):
            mtp_logits, ids, hk = [], input_ids, h
            for mtp in m.layers[L:]:
                ids, _ = shift_within_sequences(ids, cu_seqlens)
                hk = mtp(m.word_embeddings(ids), hk, rope, cu_seqlens)
                mtp_logits.append(self.logits(hk))
            mtp_logits = tuple(mtp_logits)

        loss = None
        if labels is not None:
            loss = self._next_token_loss(logits, labels, cu_seqlens)
            for k, ml in enumerate(mtp_logits or ()):
                target = labels
                for _ in range(k + 1):
                    target, valid = shift_within_sequences(target, cu_seqlens)
                    target = target.masked_fill(~valid, -100)
                loss = loss + self.config.mtp_loss_scaling_factor * self._next_token_loss(ml, target, cu_seqlens)
        return BailingHybridOutput(loss=loss, logits=logits, mtp_logits=mtp_logits, hidden_states=h,
                                   expert_ids=torch.stack(routes, 1) if routes else None)

    def moe_layers(self) -> list[int]:
        """Indices of the main-stack decoder layers with a routed MoE (the routes' layer axis)."""
        return [i for i, layer in enumerate(self.model.layers[: self.config.num_hidden_layers])
                if isinstance(layer.mlp, SparseMoeBlock)]

    @staticmethod
    def _next_token_loss(logits: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        target, valid = shift_within_sequences(labels, cu_seqlens)
        target = target.masked_fill(~valid, -100)
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)

    # -- inference through a HybridCache (contract in kpop/policy/cache.py) -------------------

    def cache_shape(self) -> CacheShape:
        types = self.config.mixer_types()
        return CacheShape(
            num_mla_layers=types.count("attention"),
            num_linear_layers=types.count("linear_attention"),
            latent_dim=self.config.kv_lora_rank + self.config.qk_rope_head_dim,
            linear_heads=self.config.num_attention_heads,
            linear_head_dim=self.config.head_dim,
        )

    @torch.no_grad()
    def forward_step(
        self,
        input_ids: torch.Tensor,
        slots: list[int],
        query_lens: list[int],
        cache: HybridCache,
        all_logits: bool = False,
        return_expert_ids: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Run new tokens of several sequences through the cache; fp32 logits of each sequence's
        last new token `[S, V]` (or of every new token `[N, V]`). Contract: kpop/policy/cache.py.
        `return_expert_ids`: `(logits, ids)`, ids int64 `[N, MoE layers, top_k]` (None without MoE)."""
        if input_ids.dim() != 1:
            raise ValueError(f"forward_step takes flat input_ids [N], got shape {tuple(input_ids.shape)}")
        if sum(query_lens) != input_ids.numel():
            raise ValueError(f"query_lens sum to {sum(query_lens)} but {input_ids.numel()} input_ids were given")
        cache.reserve(slots, query_lens)  # validates slots/lengths, raises CacheFull before any write
        ctx, positions = self._step_context(slots, query_lens, cache, input_ids.device)
        logits, routes = self.step_with_context(input_ids, positions, ctx, cache, all_logits)
        cache.advance(slots, query_lens)
        if return_expert_ids:
            return logits, routes
        return logits

    def step_with_context(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: StepContext, cache: HybridCache,
                          all_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The device part of `forward_step` (no host reads, so a decode step can be captured in a
        CUDA graph): (fp32 logits, expert ids [N, MoE layers, top_k] or None). The caller has
        reserved the cache and advances it afterwards."""
        m = self.model
        rope = m.rope(positions)
        h = m.word_embeddings(input_ids)
        mla_i = lin_i = 0
        routes = []
        for layer in m.layers[: self.config.num_hidden_layers]:
            if layer.is_mla:
                (h, ids), mla_i = layer.step(h, rope, ctx, cache.kv[mla_i]), mla_i + 1
            else:
                (h, ids), lin_i = layer.step(h, rope, ctx, cache.state[lin_i]), lin_i + 1
            if ids is not None:
                routes.append(ids)
        if not all_logits and ctx.last_tokens is not None:
            h = h[ctx.last_tokens]
        return self.logits(m.norm(h)), torch.stack(routes, 1) if routes else None

    @staticmethod
    def _step_context(slots: list[int], query_lens: list[int], cache: HybridCache, dev: torch.device):
        """The step's layout, computed on the host (which knows every length) and sent in one copy:
        reading lengths back from the device would stall the host on every step."""
        S, N = len(slots), sum(query_lens)
        past = torch.tensor([cache.seq_len(s) for s in slots], dtype=torch.long)
        slot_t = torch.tensor(slots, dtype=torch.long)
        locations = cache.host_locations(slots, query_lens)
        cache.flush()
        if N == S and bool((past > 0).all()):  # decode: one cached token per sequence
            pack = torch.cat([slot_t, past, locations]).to(dev, non_blocking=True)
            slots_d, positions, locations_d = pack.split([S, S, S])
            width = max(1, max(cache.num_blocks_of(s) for s in slots))
            ctx = StepContext(
                slots=slots_d, query_lens=list(query_lens), cu_seqlens=None, locations=locations_d,
                fresh_tokens=None, fresh_cu_seqlens=None, cached_tokens=None,
                cached_block_table=cache.tables[slots_d, :width], cached_seq_lens=(positions + 1).to(torch.int32),
                decode=True,
            )
            return ctx, positions
        lens = torch.tensor(query_lens, dtype=torch.long)
        token_seq = torch.repeat_interleave(torch.arange(S), lens)
        cu = torch.zeros(S + 1, dtype=torch.long)
        cu[1:] = lens.cumsum(0)
        positions = torch.arange(N) - cu[:-1][token_seq] + past[token_seq]
        fresh_seq = past == 0
        fresh_tok = fresh_seq[token_seq]
        fresh_cu = torch.zeros(int(fresh_seq.sum()) + 1, dtype=torch.long)
        fresh_cu[1:] = lens[fresh_seq].cumsum(0)
        cached = (~fresh_tok).nonzero().squeeze(-1)
        fresh = fresh_tok.nonzero().squeeze(-1)
        cached_slots = slot_t[token_seq[cached]]
        parts = [slot_t, cu, positions, locations, fresh, fresh_cu, cached, cached_slots, positions[cached] + 1, cu[1:] - 1]
        pack = torch.cat(parts).to(dev, non_blocking=True)
        (slots_d, cu_d, positions_d, locations_d, fresh_d, fresh_cu_d, cached_d, cached_slots_d, cached_lens_d,
         last_d) = pack.split([len(p) for p in parts])
        width = max(1, max(cache.num_blocks_of(s) for s in slots))
        ctx = StepContext(
            slots=slots_d,
            query_lens=list(query_lens),
            cu_seqlens=cu_d.to(torch.int32),
            locations=locations_d,
            fresh_tokens=fresh_d,
            fresh_cu_seqlens=fresh_cu_d.to(torch.int32),
            cached_tokens=cached_d,
            cached_block_table=cache.tables[cached_slots_d, :width],
            cached_seq_lens=cached_lens_d.to(torch.int32),
            last_tokens=last_d,
            fresh_max_len=max((n for n, p in zip(query_lens, past.tolist()) if p == 0), default=None),
        )
        return ctx, positions_d

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs) -> dict:
        # no HF cache: `generate(..., use_cache=False)` re-runs the whole prefix each step
        return {"input_ids": input_ids}


AutoModelForCausalLM.register(BailingHybridConfig, BailingMoeV2_5ForCausalLM, exist_ok=True)
