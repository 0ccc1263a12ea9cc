"""Every Triton kernel's launch config fits Hopper's shared memory, for every input dtype.

An H200 allows 232448 B per program; a config over it only fails at launch on the GPU
(triton OutOfResources), which CPU tests under TRITON_INTERPRET=1 never see. Here each kernel
is compiled for sm_90 on the CPU, down to LLVM IR (where Triton fixes the shared-memory size;
no GPU, no ptxas), with the launch config the host code would pick at Ring-2.6 shapes. The old
fp32 MLA prefill config gave 295424 B here, the very number the H200 refused (~70 s of CPU).
It runs in a subprocess: the interpreter flag that other kernel tests set at import time
replaces triton.jit for the whole process.
"""
from __future__ import annotations

import pytest

from hopper import assert_fit, shared_memory

BODY = '''
    from kernels.lightning import chunk as lc
    from kernels.mla import decode as md, prefill as mp

    for dt in (torch.float32, torch.bfloat16, torch.float16):
        t = TY[dt]
        prec = "ieee" if dt == torch.float32 else "tf32"
        # Lightning sweep, head dim 128 (forward and the reverse backward sweeps share the config)
        BT, BV, w, s = lc.launch_config(dt, 128, 128)
        sig = {n: f"*{t}" for n in ("q", "k", "v", "o")}
        sig.update(g_gamma="*fp32", h0="*fp32", ht="*fp32", cu_seqlens="*i32", o_scale="fp32", k_scale="fp32")
        # the backward's reverse-time sweeps use the same tiles (same size, checked once)
        consts = dict(H=64, KD=128, VD=128, BT=BT, BK=128, BV=BV, REVERSE=False, USE_H0=True, STORE_HT=True,
                      PREC=prec, F32PREC="ieee" if dt == torch.float32 else "tf32x3",
                      BF16=dt == torch.bfloat16, SPLIT_O=True, SPLIT_S=True, UPCAST=False)
        out[f"lightning {t}"] = shared(lc._sweep, sig, consts, w, s)
        if dt == torch.float16:
            continue  # the MLA kernels pick by dtype size only: fp16 tiles are bf16's
        # MLA prefill, Dqk 192 = 128 + 64, Dv 128
        meta = dict(H=64, DQK=192, DV=128, DA=128, DB=64, BDV=128, UPCAST=False, PREC=prec, CAUSAL=True)
        fwd, bkv, bq = mp.launch_config(dt)
        sig = {n: f"*{t}" for n in ("q", "k", "v", "o", "do", "dk", "dv", "dq")}
        sig.update(lse="*fp32", delta="*fp32", cu_seqlens="*i32", qk_scale="fp32", scale="fp32")
        for name, fn, (BM, BN, w, s) in (("fwd", mp._fwd, fwd), ("bwd dkdv", mp._bwd_dkdv, bkv), ("bwd dq", mp._bwd_dq, bq)):
            out[f"mla prefill {name} {t}"] = shared(fn, sig, dict(meta, BM=BM, BN=BN), w, s)
        # MLA decode over the 576/512 latent, 64 heads, 64-token pages
        BH, BN, w, s = md.launch_config(dt)
        sig = {"q": f"*{t}", "kv": f"*{t}", "block_table": "*i32", "seq_lens": "*i32", "o_part": "*fp32",
               "lse_part": "*fp32", "qk_scale": "fp32", "stride_bt": "i32"}
        consts = dict(H=64, DK=576, DVAL=512, DA=512, DB=64, BDV=512, PAGE=64, BH=BH, BN=BN, NS=2, SAME_V=True,
                      UPCAST=False, PAGE_TILES=True, PREC=prec)
        out[f"mla decode {t}"] = shared(md._decode_split, sig, consts, w, s)

    # the Hopper (Gluon) MLA decode: compiled with this Triton, so an API drift shows here too
    from triton.experimental.gluon._runtime import GluonASTSource
    from kernels.mla import decode_hopper as dh
    desc = "tensordesc<bf16[{}, 64],%r>" % dh.smem_layout(torch.bfloat16)
    sig = {"q_desc": desc.format(dh.BH), "kv_desc": desc.format(dh.BN), "block_table": "*i32", "seq_lens": "*i32", "o_part": "*fp32",
           "lse_part": "*fp32", "qk_scale": "fp32", "stride_bt": "i32"}
    consts = dict(H=64, NS=2, PAGE=64, BH=dh.BH, BN=dh.BN, DL=dh.DL, DR=dh.DR, NST=dh.STAGES)
    out["mla decode gluon bf16"] = shared(dh._decode_split_hopper, sig, consts, dh.NUM_WARPS, 1, source=GluonASTSource)
'''


@pytest.mark.slow
def test_launch_configs_fit_hopper_shared_memory():
    pytest.importorskip("triton.compiler.compiler")
    assert_fit(shared_memory(BODY), 2 * 5 + 2)
