"""The inference kernels (LM head GEMM, fused RMSNorm, fused router, fused RoPE, MLA cache write) compile for Hopper on the CPU
(tests/hopper.py) with the launch configs the host code picks at Ring-2.6 shapes, and fit an
H200's shared memory: the CPU interpreter never sees a config the GPU would refuse, nor the
GPU-only code (the router's libdevice sigmoid)."""
from __future__ import annotations

import pytest

from hopper import assert_fit, shared_memory

BODY = '''
    from kernels.linear import gemm
    from kernels.mla import cache as mla_cache
    from kernels.norm import rmsnorm
    from kernels.rope import rope
    from kernels.router import select

    for wdt, wt in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for M in (1, 64, 256, 4096):
            BM, BN, BK, warps, stages = gemm.launch_config(M, wdt)
            sig = dict(x="*bf16", w=f"*{wt}", out="*fp32", M="i32", N="i32", K="i32", stride_xm="i32", stride_wn="i32")
            consts = dict(stride_xk=1, stride_wk=1, BM=BM, BN=BN, BK=BK, GROUP_M=gemm.GROUP_M, EVEN_K=True,
                          SPLIT=wt == "fp32", UPCAST=False)
            out[f"lm head w={wt} M={M}"] = shared(gemm._gemm_fp32_out, sig, consts, warps, stages,
                                                     ("N", "K", "stride_xm", "stride_wn"))
    # the widest norm (Ring-2.6-1T's 8192 hidden, one row a program) and a q/k norm (many rows)
    sig = dict(x="*bf16", w="*bf16", out="*bf16", units="i32", B="i32", stride_a="i32", stride_b="i32",
               eps="fp32", inv_g="fp32")
    for G in (8192, 128):
        R, BG, warps = rmsnorm.launch_config(G)
        consts = dict(G=G, GROUPS=1, BLOCK_R=R, BLOCK_G=BG, X_DT=tl.bfloat16, OUT_DT=tl.bfloat16)
        out[f"rms norm {G}"] = shared(rmsnorm._rms_norm_fwd, sig, consts, warps, 1)
    # the router at bench-2b (32 experts) and Ring-2.6-1T (256) sizes, GPU sigmoid
    sig = dict(logits="*fp32", bias="*fp32", ids_out="*i64", w_out="*fp32", N="i32", stride_l="i32", scaling="fp32")
    for E in (32, 256):
        consts = dict(E=E, EP=E, G=8, GP=8, TOPG=4, K=8, KP=8, BT=max(1, min(64, 1024 // E)), PRECISE=True)
        out[f"router {E}"] = shared(select._route, sig, consts, 4, 1)
    # RoPE at bench-2b / Ring-2.6 sizes: Lightning's 64 of 128 dims, MLA's 64 interleaved (unit dim strides)
    sig = dict(x="*bf16", cos="*fp32", sin="*fp32", out="*bf16", units="i32", H="i32", B="i32",
               sx_a="i32", sx_b="i32", sx_h="i32", sc_a="i32", sc_b="i32", ss_a="i32", ss_b="i32")
    for name, rot, D, inter in (("lightning", 64, 128, False), ("mla", 64, 64, True)):
        U, BH, BP, warps = rope.launch_config(rot, D)
        consts = dict(sx_d=1, sc_d=1, ss_d=1, HALF=rot // 2, P=D - rot, INTERLEAVED=inter,
                      BLOCK_U=U, BLOCK_HALF=BH, BLOCK_P=BP, X_DT=tl.bfloat16)
        out[f"rope {name}"] = shared(rope._rope_fwd, sig, consts, warps, 1)
    # the MLA cache write at Ring-2.6's 576-wide latent (512 + 64), int64 slots
    ROWS, BD = mla_cache.launch_config(576)
    sig = dict(cache="*bf16", latent="*bf16", slots="*i64", N="i32", R="i32", D="i32", stride_l="i32")
    out["mla cache write"] = shared(mla_cache._cache_write, sig, dict(ROWS=ROWS, BD=BD), mla_cache.WARPS, 1)
'''


@pytest.mark.slow
def test_inference_kernels_compile_for_hopper_within_its_shared_memory():
    pytest.importorskip("triton.compiler.compiler")
    sizes = shared_memory(BODY, timeout=300)
    assert_fit(sizes, 15)
    # the GEMM pipeline really is multi-stage (loads that could not be pipelined would use a
    # fraction of this): the decode config holds all its stages of x and w tiles
    from kernels.linear.gemm import launch_config
    BM, BN, BK, _, stages = launch_config(256)
    assert sizes["lm head w=bf16 M=256"] >= stages * (BM + BN) * BK * 2
