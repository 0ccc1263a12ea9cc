"""Pure-torch Lightning attention: the test oracle and the CPU path.

Lightning attention in Ring-2.6 is simple-GLA with a constant per-head log-decay g < 0:
    S_t = exp(g) S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t.
`recurrent_lightning` is that recurrence verbatim (the oracle, run it in float64);
`chunk_lightning` is the chunked form used on CPU (C steps at a time, differentiable).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _spans(B: int, T: int, cu_seqlens: Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of each sequence."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    cu = cu_seqlens.tolist()
    return [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]


def recurrent_lightning(
    q: Tensor, k: Tensor, v: Tensor, g_gamma: Tensor, scale: float,
    initial_state: Tensor | None = None, output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Step-by-step recurrence in the dtype of q (pass float64 tensors for an oracle)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = q.dtype
    o = torch.zeros(B, T, H, V, dtype=dt, device=q.device)
    decay = g_gamma.to(dt).exp()[:, None, None]
    finals = []
    for n, (b, s, e) in enumerate(_spans(B, T, cu_seqlens)):
        S = torch.zeros(H, K, V, dtype=dt, device=q.device)
        if initial_state is not None:
            S = initial_state[n].to(dt)
        for t in range(s, e):
            S = decay * S + k[b, t].to(dt)[:, :, None] * v[b, t].to(dt)[:, None, :]
            o[b, t] = scale * torch.einsum("hk,hkv->hv", q[b, t].to(dt), S)
        finals.append(S)
    return o, (torch.stack(finals) if output_final_state else None)


def _chunk_one(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float, S: Tensor, C: int) -> tuple[Tensor, Tensor]:
    """One batch of equal-length sequences, fp32. q,k [B,T,H,K], v [B,T,H,V], S [B,H,K,V], g [H]."""
    T = q.shape[1]
    outs = []
    for s in range(0, T, C):
        qc, kc, vc = q[:, s:s + C], k[:, s:s + C], v[:, s:s + C]
        L = qc.shape[1]
        pos = torch.arange(L, device=q.device, dtype=torch.float32)
        # decay exponents (h, i, j) = g_h * (i - j), masked above the diagonal before exp
        expo = g[:, None, None] * (pos[:, None] - pos[None, :])
        D = expo.masked_fill(pos[:, None] < pos[None, :], float("-inf")).exp()
        A = torch.einsum("bihk,bjhk->bhij", qc, kc) * D
        o = torch.einsum("bhij,bjhv->bihv", A, vc)
        q_decay = (g[None, :] * (pos[:, None] + 1)).exp()  # [L, H]
        o = o + torch.einsum("bihk,bhkv->bihv", qc * q_decay[None, :, :, None], S)
        k_decay = (g[None, :] * (L - 1 - pos[:, None])).exp()
        S = (g * L).exp()[None, :, None, None] * S + torch.einsum("bjhk,bjhv->bhkv", kc * k_decay[None, :, :, None], vc)
        outs.append(o * scale)
    return torch.cat(outs, dim=1), S


def chunk_lightning(
    q: Tensor, k: Tensor, v: Tensor, g_gamma: Tensor, scale: float,
    initial_state: Tensor | None = None, output_final_state: bool = False,
    cu_seqlens: Tensor | None = None, chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Chunked form in fp32; returns o in q.dtype and the fp32 final state."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    g = g_gamma.float()
    qf, kf, vf = q.float(), k.float(), v.float()
    if cu_seqlens is None:
        S0 = initial_state.float() if initial_state is not None else q.new_zeros(B, H, K, V, dtype=torch.float32)
        o, S = _chunk_one(qf, kf, vf, g, scale, S0, chunk_size)
        return o.to(q.dtype), (S if output_final_state else None)
    outs, finals = [], []
    for n, (_, s, e) in enumerate(_spans(B, T, cu_seqlens)):
        S0 = (initial_state[n:n + 1].float() if initial_state is not None
              else q.new_zeros(1, H, K, V, dtype=torch.float32))
        o, S = _chunk_one(qf[:, s:e], kf[:, s:e], vf[:, s:e], g, scale, S0, chunk_size)
        outs.append(o)
        finals.append(S)
    o = torch.cat(outs, dim=1)
    return o.to(q.dtype), (torch.cat(finals) if output_final_state else None)


def decode_lightning(
    q: Tensor, k: Tensor, v: Tensor, g_gamma: Tensor, state: Tensor, state_slots: Tensor, scale: float,
) -> Tensor:
    """One recurrent step per sequence; state[state_slots] (fp32 or bf16) is updated in place.
    The step runs in fp32 and the output reads the unrounded state; only the store rounds (bf16)."""
    S = state[state_slots].float()
    S = g_gamma.float().exp()[None, :, None, None] * S + k.float()[..., :, None] * v.float()[..., None, :]
    state[state_slots] = S.to(state.dtype)
    return (scale * torch.einsum("bhk,bhkv->bhv", q.float(), S)).to(q.dtype)
