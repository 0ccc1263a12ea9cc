"""Hybrid-attention and MoE kernels shared by training and rollout: Triton kernels with a pure-torch
reference beside each (the test oracle and the CPU path).

    kernels.lightning: lightning_attn (chunked, fwd+bwd, varlen, state in/out), lightning_decode
    kernels.mla:       mla_prefill (flash, fwd+bwd, varlen), mla_decode (paged latent MQA), mla_cache_write
    kernels.moe:       moe_ffn (routed experts: device-side sort by expert, grouped GEMM fwd+bwd)

KPOP_KERNELS=auto|triton|torch picks the implementation (kernels/_dispatch.py).
"""
