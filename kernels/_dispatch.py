"""Choose between the Triton kernels and the pure-torch references.

KPOP_KERNELS (read at every call, so tests can flip it):
  auto   (default) Triton when every tensor is on CUDA, the torch reference otherwise;
  triton force Triton (on CPU only works under TRITON_INTERPRET=1);
  torch  force the reference.
"""
from __future__ import annotations

import os
from typing import Literal

import torch

Backend = Literal["triton", "torch"]
_MODES = ("auto", "triton", "torch")


def backend(*tensors: torch.Tensor | None) -> Backend:
    mode = os.environ.get("KPOP_KERNELS", "auto").strip().lower()
    if mode not in _MODES:
        raise ValueError(f"KPOP_KERNELS={mode!r}: expected one of {_MODES}")
    if mode == "torch":
        return "torch"
    if mode == "triton":
        on_cuda = all(t.is_cuda for t in tensors if t is not None)
        if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "KPOP_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 (set before triton is imported)"
            )
        return "triton"
    return "triton" if all(t.is_cuda for t in tensors if t is not None) else "torch"


def check(cond: bool, msg: str) -> None:
    """Raise a ValueError naming the bad argument (asserts vanish under -O)."""
    if not cond:
        raise ValueError(msg)
