"""Small helpers shared by the Triton kernels."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def upcast_dots(dtype: torch.dtype) -> bool:
    """Triton 3.9's CPU interpreter (TRITON_INTERPRET=1) returns garbage for tl.dot on bf16
    operands (fp16 and fp32 are right), so under the interpreter bf16 products are done in fp32.
    Compiled kernels always multiply in the input dtype."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def mm(a, b, UPCAST: tl.constexpr, PREC: tl.constexpr):
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PREC)
    return c
