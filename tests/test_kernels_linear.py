"""The fp32-output GEMM (kernels/linear, the LM head) against the fp32 GEMM, on CPU under
TRITON_INTERPRET=1 (on a CUDA machine the same tests run the compiled kernel).

16-bit x 16-bit products are exact in fp32, so the kernel and F.linear(x.float(), w.float()) sum the
same fp32 numbers in different orders: relative errors ~1e-7 against a float64 oracle here (the fp32
GEMM's own ~2e-7), so the bound is 1e-6. That bound also proves an fp32 w is split into all three
bf16 pieces: rounding w to bf16 gives ~2e-3, dropping the third piece ~1e-5. Each launch config
(M <= 64, M <= 512, larger M) is run, with a K that is no multiple of the K tile.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

if not torch.cuda.is_available():
    # must be set before any kernel module is imported: triton.jit reads it at decoration time
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.linear import linear_fp32, linear_fp32_ref  # noqa: E402
from kernels.linear.gemm import launch_config  # noqa: E402
from numerics import relerr  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOPPER_SMEM = 232448
TOL = 1e-6


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("KPOP_KERNELS", "triton")


@pytest.mark.parametrize("dtype,w_dtype", [
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),  # the fp32 head of a bf16 model: w split into three bf16 pieces
])
@pytest.mark.parametrize("M,N,K", [(1, 200, 128), (37, 130, 96), (64, 256, 64), (70, 300, 160), (513, 260, 64)])
def test_kernel_equals_the_fp32_gemm(M, N, K, dtype, w_dtype, seed):
    x = torch.randn(M, K, device=DEV).to(dtype)
    # an fp32 w uses all 24 significand bits: rounding it to bf16 alone would be off by ~1e-3
    w = (torch.randn(N, K, device=DEV) * K**-0.5).to(w_dtype)
    with torch.no_grad():
        out = linear_fp32(x, w)
    want = F.linear(x.float(), w.float())
    assert out.dtype == torch.float32 and out.shape == (M, N)
    assert relerr(out, want) < TOL
    assert relerr(out, x.double() @ w.double().T) < TOL


def test_each_regime_has_its_own_tiles():
    # the three regimes above really take three configs (the decode ones cover M with few row tiles)
    for w_dtype in (torch.bfloat16, torch.float32):
        small, decode, prefill = (launch_config(m, w_dtype) for m in (37, 256, 4096))
        assert small[0] == 64 and decode[0] == 128 and len({small, decode}) == 2
        assert launch_config(1, w_dtype)[0] == 16  # the smallest tile tl.dot takes
    assert launch_config(4096) != launch_config(256)


def test_strided_and_batched_inputs(seed):
    # [B, T, K] hidden states, and the last position of each row (a strided view, read in place)
    h = torch.randn(3, 7, 64, device=DEV).bfloat16()
    w = torch.randn(90, 64, device=DEV).bfloat16() * 0.125
    with torch.no_grad():
        full, last = linear_fp32(h, w), linear_fp32(h[:, -1], w)
    assert full.shape == (3, 7, 90) and last.shape == (3, 90)
    assert relerr(full, linear_fp32_ref(h, w)) < TOL
    assert relerr(last, linear_fp32_ref(h[:, -1], w)) < TOL
    with torch.no_grad():
        assert linear_fp32(h[:0], w).shape == (0, 7, 90)


def test_autograd_fp32_and_mixed_dtypes_keep_the_reference(seed):
    x = torch.randn(5, 32, device=DEV).bfloat16().requires_grad_()
    w = torch.randn(40, 32, device=DEV).bfloat16().requires_grad_()
    out = linear_fp32(x, w)  # training: differentiable, the fp32 GEMM itself
    assert out.grad_fn is not None and torch.equal(out, linear_fp32_ref(x, w))
    out.sum().backward()
    assert x.grad is not None and w.grad is not None
    with torch.no_grad():
        a, b = torch.randn(5, 32, device=DEV), torch.randn(40, 32, device=DEV)
        assert torch.equal(linear_fp32(a, b), F.linear(a, b))  # fp32 x: the fp32 GEMM
        assert torch.equal(linear_fp32(a.half(), b), F.linear(a.half().float(), b))  # fp16 x, fp32 w


def test_mismatched_shapes_are_named():
    with pytest.raises(ValueError, match=r"must share K, got \(4, 32\) and \(10, 16\)"):
        linear_fp32(torch.randn(4, 32, device=DEV), torch.randn(10, 16, device=DEV))


def test_model_lm_head_uses_the_kernel_under_no_grad(monkeypatch, seed):
    """A bf16 model keeps its LM head weight in fp32 (kpop.policy.checkpoint.set_dtype): the split path."""
    from kpop.policy.checkpoint import build_model
    from kpop.policy.presets import tiny_config

    import kernels.linear.gemm as kg

    calls = []
    real = kg.linear_fp32_triton
    monkeypatch.setattr(kg, "linear_fp32_triton", lambda *a: calls.append(1) or real(*a))
    model = build_model(tiny_config(300), seed=0, device=DEV, dtype="bfloat16").eval()
    assert model.lm_head.weight.dtype == torch.float32
    h = torch.randn(2, 9, model.config.hidden_size, device=DEV).bfloat16()
    want = model.logits(h)  # autograd on: the fp32 head
    assert want.grad_fn is not None and not calls
    with torch.no_grad():
        got = model.logits(h)
    assert calls and got.dtype == torch.float32
    assert relerr(got, want.detach()) < TOL


SMEM_SCRIPT = textwrap.dedent('''
    import json
    import torch
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton._C.libtriton import ir
    from kernels.linear import gemm
    from kernels.norm import rmsnorm

    TARGET = GPUTarget("cuda", 90, 32)

    def shared(fn, sig, consts, warps, stages):
        names = fn.arg_names
        # as the runtime specialises them: 16-byte aligned pointers and leading dims, unit strides
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
                 if t.startswith("*") or n in ("N", "K", "stride_xm", "stride_wn")}
        src = ASTSource(fn=fn, signature={n: sig.get(n, "constexpr") for n in names},
                        constexprs={k: v for k, v in consts.items() if k in names}, attrs=attrs)
        backend = make_backend(TARGET)
        options = backend.parse_options(dict(num_warps=warps, num_stages=stages))
        passes = {}
        backend.add_stages(passes, options, src.language)
        ctx = ir.context()
        ir.load_dialects(ctx)
        backend.load_dialects(ctx)
        mod = src.make_ir(TARGET, options, backend.get_codegen_implementation(options), backend.get_module_map(), ctx)
        meta = {"target": TARGET, **options.__dict__}
        for ext in ("ttir", "ttgir", "llir"):
            mod = passes[ext](mod, meta)
        return meta["shared"]

    out = {}
    for wdt, wt in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for M in (1, 64, 256, 4096):
            BM, BN, BK, warps, stages = gemm.launch_config(M, wdt)
            sig = dict(x="*bf16", w=f"*{wt}", out="*fp32", M="i32", N="i32", K="i32", stride_xm="i32", stride_wn="i32")
            consts = dict(stride_xk=1, stride_wk=1, BM=BM, BN=BN, BK=BK, GROUP_M=gemm.GROUP_M, EVEN_K=True,
                          SPLIT=wt == "fp32", UPCAST=False)
            out[f"lm head w={wt} M={M}"] = shared(gemm._gemm_fp32_out, sig, consts, warps, stages)
    # the widest norm (Ring-2.6-1T's 8192 hidden), one row a program, 16 warps
    sig = dict(x="*bf16", w="*bf16", out="*bf16", units="i32", B="i32", stride_a="i32", stride_b="i32",
               eps="fp32", inv_g="fp32")
    consts = dict(G=8192, GROUPS=1, BLOCK_R=1, BLOCK_G=8192, X_DT=tl.bfloat16, OUT_DT=tl.bfloat16)
    out["rms norm 8192"] = shared(rmsnorm._rms_norm_fwd, sig, consts, 16, 1)
    print(json.dumps(out))
''')


@pytest.mark.slow
def test_launch_configs_compile_for_hopper_within_its_shared_memory():
    """Every LM-head config (and the norm kernel) compiles for sm_90 on the CPU (to LLVM IR, where
    Triton fixes the shared memory) and fits an H200's 232448 B per program: the CPU interpreter
    never sees a config the GPU would refuse. A subprocess: the interpreter flag replaces triton.jit."""
    pytest.importorskip("triton.compiler.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-c", SMEM_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    sizes = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(sizes) == 9, sizes
    over = {k: v for k, v in sizes.items() if not 0 < v <= HOPPER_SMEM}
    assert not over, f"shared memory over {HOPPER_SMEM} B (or none reported): {over}; all: {sizes}"
    # the pipeline really is multi-stage (a config whose loads could not be pipelined would use
    # a fraction of this): the decode config holds its stages of x and w tiles
    BM, BN, BK, _, stages = launch_config(256)
    assert sizes["lm head w=bf16 M=256"] >= stages * (BM + BN) * BK * 2
