"""Hybrid-attention and MoE kernels shared by training and rollout: Triton kernels with a pure-torch
reference beside each (the test oracle and the CPU path).

    kernels.lightning: lightning_attn (chunked, fwd+bwd, varlen, state in/out), lightning_decode
    kernels.mla:       mla_prefill (flash, fwd+bwd, varlen), mla_decode (paged latent MQA), mla_cache_write
    kernels.moe:       moe_ffn (routed experts: device-side sort by expert, grouped GEMM fwd+bwd)
    kernels.router:    route (the MoE router after its GEMM: sigmoid, group-limited top-k, weights; inference)
    kernels.norm:      rms_norm (RMSNorm / group RMSNorm forward in one kernel; inference)
    kernels.rope:      apply_rope (RoPE on q/k heads: partial, interleaved, strided views; inference)
    kernels.linear:    linear_fp32 (fp32-output GEMM on tensor cores for the LM head; inference)

KPOP_KERNELS=auto|triton|torch picks the implementation (kernels/_dispatch.py).
"""
