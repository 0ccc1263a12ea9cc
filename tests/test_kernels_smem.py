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

import json
import os
import subprocess
import sys
import textwrap

import pytest

HOPPER_SMEM = 232448
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton._C.libtriton import ir
    from kernels.lightning import chunk as lc
    from kernels.mla import decode as md, prefill as mp

    TARGET = GPUTarget("cuda", 90, 32)
    TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

    def shared(fn, sig, consts, cfg_warps, cfg_stages, source=ASTSource):
        names = fn.arg_names
        # pointers 16-byte aligned, as the runtime specialises them (this enables the async copies)
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items() if n in names and t.startswith("*")}
        consts = {k: v for k, v in consts.items() if k in names}
        src = source(fn=fn, signature={n: sig.get(n, "constexpr") for n in names}, constexprs=consts, attrs=attrs)
        backend = make_backend(TARGET)
        options = backend.parse_options(dict(num_warps=cfg_warps, num_stages=cfg_stages))
        stages = {}
        backend.add_stages(stages, options, src.language)
        ctx = ir.context()
        ir.load_dialects(ctx)
        backend.load_dialects(ctx)
        mod = src.make_ir(TARGET, options, backend.get_codegen_implementation(options), backend.get_module_map(), ctx)
        meta = {"target": TARGET, **options.__dict__}
        for ext in [e for e in ("ttir", "ttgir", "llir") if e in stages]:  # Gluon starts at ttgir
            mod = stages[ext](mod, meta)
        return meta["shared"]

    out = {}
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
    out["mla decode gluon bf16"] = shared(dh._decode_split_hopper, sig, consts, dh.NUM_WARPS, 1, GluonASTSource)
    print(json.dumps(out))
''')


@pytest.mark.slow
def test_launch_configs_fit_hopper_shared_memory():
    pytest.importorskip("triton.compiler.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    sizes = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(sizes) == 2 * 5 + 2, sizes
    over = {k: v for k, v in sizes.items() if not 0 < v <= HOPPER_SMEM}
    assert not over, f"shared memory over {HOPPER_SMEM} B (or none reported): {over}; all: {sizes}"
