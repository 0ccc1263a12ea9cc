"""Compile Triton kernels for Hopper (sm_90) on the CPU and read the shared memory each program
takes: a launch config over the H200's 232448 B only fails at launch on the GPU (triton
OutOfResources), which CPU tests under TRITON_INTERPRET=1 never see.

    sizes = shared_memory(BODY)   # BODY fills `out[name] = shared(fn, sig, consts, warps, stages)`
    assert_fit(sizes, count)

Each kernel is compiled down to LLVM IR (where Triton fixes the shared-memory size; no GPU, no
ptxas) in a subprocess: the interpreter flag that the kernel tests set at import time replaces
triton.jit for the whole process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

HOPPER_SMEM = 232448
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELUDE = textwrap.dedent('''
    import json
    import torch
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton._C.libtriton import ir

    TARGET = GPUTarget("cuda", 90, 32)
    TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    out = {}

    def shared(fn, sig, consts, warps, stages, aligned=(), source=ASTSource):
        """Bytes of shared memory per program of `fn` compiled with these arguments. Pointers and
        the `aligned` integer arguments are marked 16-divisible, as the runtime specialises them at
        real shapes (what lets loads become pipelined async copies)."""
        names = fn.arg_names
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
                 if n in names and (t.startswith("*") or n in aligned)}
        src = source(fn=fn, signature={n: sig.get(n, "constexpr") for n in names},
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
        for ext in [e for e in ("ttir", "ttgir", "llir") if e in passes]:  # Gluon starts at ttgir
            mod = passes[ext](mod, meta)
        return meta["shared"]
''')


def shared_memory(body: str, timeout: int = 900) -> dict[str, int]:
    """Run PRELUDE + `body` (which fills `out`) in a fresh interpreter; {name: bytes}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def assert_fit(sizes: dict[str, int], count: int) -> None:
    """`count` kernels compiled, none using more shared memory than Hopper has."""
    assert len(sizes) == count, sizes
    over = {k: v for k, v in sizes.items() if not 0 <= v <= HOPPER_SMEM}
    assert not over, f"shared memory over {HOPPER_SMEM} B: {over}; all: {sizes}"
