"""Shared numeric checks of the kernel tests."""

from __future__ import annotations

import torch


def relerr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; fails on NaN (NaN compares unequal to itself)."""
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err == err, "NaN in output"
    return err
