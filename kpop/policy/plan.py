"""Sizes of a Ring-2.6 architecture from its config alone: parameters, caches, memory.

Conventions (they reproduce the published 104B/7.4B Ling-2.6-flash and ~1T/~63B Ring-2.6-1T):
* `total_params` / `active_params` count the main model incl. embeddings and LM head; the MTP
  layers (training-only) are reported apart as `mtp_params`. Buffers (expert bias) are excluded.
* active = everything a token passes through: all dense parts + the shared expert + the router +
  `num_experts_per_tok` routed experts in every MoE layer.
* training memory = ZeRO-3 sharding of bf16 params + bf16 grads + fp32 master weights and fp32
  Adam moments (2 + 2 + 4 + 4 + 4 = 16 bytes/param), activations excluded.
* serving memory = bf16 weights (main model) + bf16 MLA latent cache + fp32 Lightning states.
"""

from __future__ import annotations

from pydantic import BaseModel

from kpop.policy.config import BailingHybridConfig, config_from_arch

TRAIN_BYTES_PER_PARAM = 2 + 2 + 4 + 4 + 4
GIB = 1 << 30


class ParamCounts(BaseModel):
    embedding: int
    lm_head: int
    linear_attention_layer: int
    mla_layer: int
    dense_mlp: int
    moe_total: int  # one MoE block, all experts
    moe_active: int  # one MoE block, what a token uses
    mtp_layer_total: int
    mtp_layer_active: int


class PolicyPlan(BaseModel):
    total_params: int
    active_params: int
    mtp_params: int
    num_mla_layers: int
    num_linear_layers: int
    mla_cache_bytes_per_token: int  # all MLA layers, bf16 latent (kv_lora_rank + rope dims)
    linear_state_bytes_per_sequence: int  # all Lightning layers, fp32 [H, K, V] state
    train_bytes_total: int  # ZeRO-3 model states, whole job (incl. MTP)
    train_bytes_per_gpu: dict[int, int]  # for N GPUs
    serve_weight_bytes: int  # bf16 main-model weights
    serve_sequences: int
    serve_context_tokens: int
    serve_cache_bytes: int  # caches for serve_sequences x serve_context_tokens
    serve_bytes_total: int
    counts: ParamCounts


def count_params(c: BailingHybridConfig) -> ParamCounts:
    D, H, hd = c.hidden_size, c.num_attention_heads, c.head_dim
    norm = D
    qkv_bias, out_bias = c.use_qkv_bias, c.use_bias
    linear = (
        D * 3 * H * hd + qkv_bias * 3 * H * hd
        + (2 * hd if c.use_qk_norm else 0)
        + D * H * hd  # g_proj
        + H * hd  # g_norm
        + H * hd * D + out_bias * D  # dense
    )
    dqk, r = c.qk_nope_head_dim + c.qk_rope_head_dim, c.kv_lora_rank
    if c.q_lora_rank:
        q = D * c.q_lora_rank + qkv_bias * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * dqk
    else:
        q = D * H * dqk
    mla = (
        q
        + D * (r + c.qk_rope_head_dim) + qkv_bias * (r + c.qk_rope_head_dim)
        + r  # kv_a_layernorm
        + r * H * (c.qk_nope_head_dim + c.v_head_dim)
        + H * c.v_head_dim * D + qkv_bias * D
    )
    dense = 3 * D * c.intermediate_size
    if c.num_experts:
        expert = 3 * D * c.moe_intermediate_size
        shared = expert * (c.num_shared_experts or 0)
        router = c.num_experts * D
        moe_total = router + c.num_experts * expert + shared
        moe_active = router + c.num_experts_per_tok * expert + shared
    else:
        moe_total = moe_active = dense
    mtp_common = 2 * norm + 2 * D * D + 2 * norm + mla + norm  # enorm, hnorm, eh_proj, 2 norms, MLA, final
    return ParamCounts(
        embedding=c.vocab_size * D,
        lm_head=c.vocab_size * D,
        linear_attention_layer=linear + 2 * norm,
        mla_layer=mla + 2 * norm,
        dense_mlp=dense,
        moe_total=moe_total,
        moe_active=moe_active,
        mtp_layer_total=mtp_common + moe_total,
        mtp_layer_active=mtp_common + moe_active,
    )


def plan_policy(
    c: BailingHybridConfig,
    gpus: list[int] = (8, 16, 32, 64, 128, 256),
    serve_sequences: int = 1,
    serve_context_tokens: int = 4096,
) -> PolicyPlan:
    c.check_architecture()
    n = count_params(c)
    types = c.mixer_types()
    n_mla, n_lin = types.count("attention"), types.count("linear_attention")
    n_dense = min(c.first_k_dense_replace, c.num_hidden_layers) if c.num_experts else c.num_hidden_layers
    n_moe = c.num_hidden_layers - n_dense
    base = n.embedding + n.lm_head + c.hidden_size + n_lin * n.linear_attention_layer + n_mla * n.mla_layer
    total = base + n_dense * n.dense_mlp + n_moe * n.moe_total
    active = base + n_dense * n.dense_mlp + n_moe * n.moe_active
    mtp = c.num_nextn_predict_layers * n.mtp_layer_total
    mla_tok = n_mla * (c.kv_lora_rank + c.qk_rope_head_dim) * 2
    lin_seq = n_lin * c.num_attention_heads * c.head_dim * c.head_dim * 4
    train = (total + mtp) * TRAIN_BYTES_PER_PARAM
    cache = serve_sequences * (serve_context_tokens * mla_tok + lin_seq)
    return PolicyPlan(
        total_params=total,
        active_params=active,
        mtp_params=mtp,
        num_mla_layers=n_mla,
        num_linear_layers=n_lin,
        mla_cache_bytes_per_token=mla_tok,
        linear_state_bytes_per_sequence=lin_seq,
        train_bytes_total=train,
        train_bytes_per_gpu={g: -(-train // g) for g in sorted(set(gpus))},
        serve_weight_bytes=total * 2,
        serve_sequences=serve_sequences,
        serve_context_tokens=serve_context_tokens,
        serve_cache_bytes=cache,
        serve_bytes_total=total * 2 + cache,
        counts=n,
    )


def plan_run_config(cfg) -> PolicyPlan:
    """Plan a `kpop.config.RunConfig`'s policy: the checkpoint's config.json if set (no weights
    read), else `policy.arch` (empty = `policy.preset`); serving is sized for one rollout
    worker's `max_concurrent_episodes x group_size` sequences of `max_episode_tokens`."""
    import json

    from kpop.policy.presets import preset_arch
    from kpop.policy.tokenizer import DEFAULT_VOCAB_SIZE

    p = cfg.policy
    if p.checkpoint is not None:
        from kpop.policy.checkpoint import load_config

        arch = load_config(p.checkpoint)
    else:
        fields = dict(p.arch) if p.arch else preset_arch(p.preset)
        if "vocab_size" not in fields:
            vocab = DEFAULT_VOCAB_SIZE
            if p.tokenizer is not None and (p.tokenizer / "tokenizer.json").is_file():
                tj = json.loads((p.tokenizer / "tokenizer.json").read_text())
                vocab = len(tj["model"]["vocab"]) + sum(1 for t in tj.get("added_tokens", []) if t["id"] >= len(tj["model"]["vocab"]))
            fields["vocab_size"] = vocab
        arch = config_from_arch(fields)
    gpus = [8, 16, 32, 64, 128, 256]
    if cfg.learner.num_gpus >= 1:  # a share of one GPU plans as one
        gpus.append(int(cfg.learner.num_gpus))
    return plan_policy(
        arch,
        gpus=gpus,
        serve_sequences=cfg.rollout.max_concurrent_episodes * cfg.rollout.group_size,
        serve_context_tokens=cfg.rollout.max_episode_tokens,
    )


class SyncPlan(BaseModel):
    """One weight sync, learner -> rollout engines, at the given rates (an estimate, not a measurement)."""

    weight_bytes: int  # bf16 main-model weights: what a sync moves
    bucket_bytes: int
    buckets: int
    copy_gb_per_s: float  # same-node device copy: packing buckets on the learner, unpacking on the engine
    nccl_gb_per_s: float  # broadcast bus bandwidth from learner rank 0 to the rollout ranks
    pack_s: float
    broadcast_s: float
    unpack_s: float
    seconds: float  # serial sum: an upper bound, since bucket k+1 packs while bucket k is on the wire
    pipelined_s: float  # lower bound with the three stages overlapped bucket by bucket


def plan_weight_sync(p: PolicyPlan, bucket_bytes: int, copy_gb_per_s: float, nccl_gb_per_s: float) -> SyncPlan:
    """Estimate a bucketed weight sync: each bucket is packed (device copy), broadcast, unpacked."""
    if bucket_bytes <= 0 or copy_gb_per_s <= 0 or nccl_gb_per_s <= 0:
        raise ValueError("bucket size and rates must be positive")
    n = p.serve_weight_bytes
    buckets = -(-n // bucket_bytes)
    pack = unpack = n / (copy_gb_per_s * 1e9)
    wire = n / (nccl_gb_per_s * 1e9)
    one = bucket_bytes / 1e9  # the pipeline's fill and drain: one bucket through the other stages
    return SyncPlan(weight_bytes=n, bucket_bytes=bucket_bytes, buckets=buckets, copy_gb_per_s=copy_gb_per_s,
                    nccl_gb_per_s=nccl_gb_per_s, pack_s=pack, broadcast_s=wire, unpack_s=unpack,
                    seconds=pack + wire + unpack,
                    pipelined_s=max(pack, wire, unpack) + 2 * one / min(copy_gb_per_s, nccl_gb_per_s))


def format_sync(s: SyncPlan) -> str:
    return (f"weight sync       {s.weight_bytes / GIB:,.1f} GiB in {s.buckets} buckets of {s.bucket_bytes / (1 << 20):,.0f} MiB:"
            f" pack {s.pack_s:.2f} s + broadcast {s.broadcast_s:.2f} s + unpack {s.unpack_s:.2f} s"
            f" = {s.seconds:.2f} s serial, {s.pipelined_s:.2f} s pipelined"
            f" (copy {s.copy_gb_per_s:g} GB/s, NCCL {s.nccl_gb_per_s:g} GB/s)")


def _human(n: float, unit: str = "") -> str:
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def format_plan(p: PolicyPlan) -> str:
    gib = lambda b: f"{b / GIB:,.1f} GiB"  # noqa: E731
    lines = [
        f"parameters        total {_human(p.total_params)} ({p.total_params:,})  active/token {_human(p.active_params)} ({p.active_params:,})",
        f"MTP layers        {_human(p.mtp_params)} (training only, not in the totals)",
        f"layers            {p.num_linear_layers} Lightning + {p.num_mla_layers} MLA",
        f"MLA cache         {p.mla_cache_bytes_per_token:,} bytes/token (bf16 latent)",
        f"Lightning state   {p.linear_state_bytes_per_sequence:,} bytes/sequence (fp32)",
        f"train (ZeRO-3)    {gib(p.train_bytes_total)} model states = {TRAIN_BYTES_PER_PARAM} B/param, activations extra",
    ]
    lines += [f"  over {g:>4} GPUs   {gib(b)} per GPU" for g, b in p.train_bytes_per_gpu.items()]
    lines.append(
        f"serve             {gib(p.serve_bytes_total)} = weights {gib(p.serve_weight_bytes)} + caches {gib(p.serve_cache_bytes)}"
        f" ({p.serve_sequences} seqs x {p.serve_context_tokens} tokens)"
    )
    return "\n".join(lines)
