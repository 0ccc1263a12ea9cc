"""The MoE grouped-GEMM kernels (kernels/moe) against the loop oracle, on CPU under TRITON_INTERPRET=1.

Relative errors ||out - ref|| / ||ref|| against a float64 oracle, forward and every gradient (x,
routing weights, the three expert weights). Shapes are small but ragged: an expert with more rows
than a tile, experts with none, sizes that are no multiple of any tile. bf16 is checked on the GPU
(tests/test_kernels_gpu.py): the interpreter's bf16 cast truncates, which doubles its error.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # must be set before any kernel module is imported: triton.jit reads it at decoration time
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels.moe import moe_ffn, moe_loop, moe_sorted, sort_by_expert  # noqa: E402
from kernels.moe import sort as msort  # noqa: E402
from kernels.moe.reference import sum_slots as sum_slots_ref  # noqa: E402
from hopper import assert_fit, shared_memory  # noqa: E402
from numerics import relerr  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def routed(N: int, E: int, k: int, hot: int | None = 0, cold: int | None = None) -> torch.Tensor:
    """[N, k] distinct experts per token; `hot` is in every token's set (more rows than a tile),
    `cold` in none (an expert with no rows)."""
    rows = []
    for _ in range(N):
        pool = [e for e in torch.randperm(E).tolist() if e not in (hot, cold)]
        rows.append(([hot] if hot is not None else []) + pool[: k - (hot is not None)])
    return torch.tensor(rows, device=DEV)


def problem(N, D, I, E, k, dtype):
    x = torch.randn(N, D, device=DEV, dtype=dtype)
    w = torch.rand(N, k, device=DEV) + 0.1
    wg, wu = (torch.randn(E, I, D, device=DEV, dtype=dtype) * D ** -0.5 for _ in range(2))
    wd = torch.randn(E, D, I, device=DEV, dtype=dtype) * I ** -0.5
    return x, w, wg, wu, wd


def run(fn, ids, leaves, dout):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(leaves[0], ids, leaves[1], *leaves[2:])
    (out.to(dout.dtype) * dout).sum().backward()
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
def test_grouped_gemm_fwd_bwd_matches_loop_oracle(monkeypatch, dtype, tol, seed):
    monkeypatch.setenv("KPOP_KERNELS", "triton")
    N, D, I, E, k = 70, 48, 40, 6, 3
    ids = routed(N, E, k, hot=0, cold=5)
    x, w, wg, wu, wd = problem(N, D, I, E, k, dtype)
    dout = torch.randn(N, D, device=DEV, dtype=torch.float64)
    out, grads = run(moe_ffn, ids, (x, w, wg, wu, wd), dout.to(dtype))
    ref, ref_grads = run(moe_loop, ids, [t.double() for t in (x, w, wg, wu, wd)], dout)
    assert out.dtype == dtype and out.shape == (N, D)
    assert relerr(out, ref) < tol, f"out rel err {relerr(out, ref):.2e} (seed {seed})"
    for name, g, r in zip(("dx", "dweights", "dw_gate", "dw_up", "dw_down"), grads, ref_grads):
        assert g is not None, f"{name}: no gradient"
        assert relerr(g, r) < tol, f"{name} rel err {relerr(g, r):.2e} >= {tol} (seed {seed})"
    assert grads[1].dtype == torch.float32  # routing weights keep their fp32 gradient
    assert grads[2][5].abs().max() == 0 and grads[4][5].abs().max() == 0  # the cold expert learns nothing


def test_grouped_gemm_without_grad_and_with_one_expert_per_token(monkeypatch, seed):
    monkeypatch.setenv("KPOP_KERNELS", "triton")
    N, D, I, E, k = 21, 32, 24, 4, 1
    ids = routed(N, E, k, hot=None)
    x, w, wg, wu, wd = problem(N, D, I, E, k, torch.float32)
    with torch.no_grad():
        out = moe_ffn(x, ids, w, wg, wu, wd)
    ref = moe_loop(x.double(), ids, w.double(), wg.double(), wu.double(), wd.double())
    assert relerr(out, ref) < 1e-5


def test_sorted_torch_path_equals_loop_and_accepts_per_expert_lists(monkeypatch, seed):
    monkeypatch.setenv("KPOP_KERNELS", "torch")
    N, D, I, E, k = 33, 16, 12, 5, 2
    ids = routed(N, E, k, hot=1, cold=3)
    x, w, wg, wu, wd = (t.double() for t in problem(N, D, I, E, k, torch.float32))
    dout = torch.randn(N, D, device=DEV, dtype=torch.float64)
    out, grads = run(moe_ffn, ids, (x, w, wg, wu, wd), dout)
    ref, ref_grads = run(moe_loop, ids, (x, w, wg, wu, wd), dout)
    assert relerr(out, ref) < 1e-12 and all(relerr(g, r) < 1e-12 for g, r in zip(grads, ref_grads))
    lists = moe_ffn(x, ids, w, list(wg), list(wu), list(wd))  # per-expert matrices, as the block passes them
    assert relerr(lists, ref) < 1e-12


def test_sort_by_expert_groups_rows_in_token_order():
    ids = torch.tensor([[2, 0], [0, 1], [2, 1]], device=DEV)
    order, counts = sort_by_expert(ids, 4)
    assert counts.tolist() == [2, 2, 2, 0] and counts.dtype == torch.int32
    assert order.tolist() == [1, 2, 3, 5, 0, 4]  # flat rows t*k + j of experts 0, 1, 2


def sort_cases():
    """(name, ids, E): ragged layouts for the counting sort. M = N*k spans one program and several
    (BLOCK rows each: 16 at E = 256, 256 at E <= 16) and more than one histogram step (HIST ids)."""
    g = torch.Generator().manual_seed(1234)

    def rnd(N, k, E, dtype=torch.long):
        return torch.randint(0, E, (N, k), generator=g).to(dtype)

    return [
        ("N=1", rnd(1, 8, 32), 32),
        ("k=1", rnd(300, 1, 7), 7),
        ("N=1 k=1 E=1", torch.zeros(1, 1, dtype=torch.long), 1),
        ("one expert has every row", torch.full((100, 4), 3, dtype=torch.long), 9),
        ("the last expert has every row", torch.full((40, 8), 255, dtype=torch.long), 256),
        ("empty experts: top-k routing, one hot, one cold", routed(150, 12, 4, hot=2, cold=7).cpu(), 12),
        ("only even experts", rnd(90, 3, 10) // 2 * 2, 20),
        ("E=256 bench decode", rnd(256, 8, 256), 256),
        ("E=32 past one histogram step", rnd(160, 8, 32), 32),
        ("E=48 not a power of two", rnd(37, 5, 48), 48),
        ("int32 ids", rnd(64, 6, 33, torch.int32), 33),
        ("strided ids", rnd(8, 50, 16).t(), 16),
    ]


@pytest.mark.parametrize("name,ids,E", sort_cases(), ids=[c[0] for c in sort_cases()])
def test_counting_sort_equals_the_torch_sort(name, ids, E):
    """order, counts and offsets of the one-launch kernel are the torch path's, bit for bit."""
    ids = ids.to(DEV)
    assert msort.fits_counting_sort(ids.numel(), E)
    order, counts, offsets = msort.sort_small(ids, E)
    ref_order, ref_counts = sort_by_expert(ids, E)
    assert order.dtype == counts.dtype == offsets.dtype == torch.int32
    assert torch.equal(order, ref_order.to(torch.int32)), name
    assert torch.equal(counts, ref_counts), name
    assert offsets.tolist() == [0] + ref_counts.cumsum(0).tolist(), name
    assert all(map(torch.equal, (order, counts, offsets), msort.sort_torch(ids, E)))


def test_expert_layout_picks_the_counting_sort_for_decode_sizes_only():
    assert msort.fits_counting_sort(256 * 8, 32) and msort.fits_counting_sort(256 * 8, 256)
    assert msort.fits_counting_sort(msort.SMALL_ROWS, 256)
    assert not msort.fits_counting_sort(msort.SMALL_ROWS + 1, 32)  # training batches: the radix sort
    assert not msort.fits_counting_sort(64, 512)
    assert not msort.fits_counting_sort(0, 32)  # no zero-size grid
    ids = torch.zeros(0, 8, dtype=torch.long, device=DEV)
    order, counts, offsets = msort.expert_layout(ids, 4)
    assert order.numel() == 0 and counts.tolist() == [0] * 4 and offsets.tolist() == [0] * 5


def test_moe_ffn_gives_the_same_bits_with_either_sort(monkeypatch, seed):
    """The grouped GEMM with the counting sort (decode sizes) and with the torch sort (forced by a
    zero threshold): output and every gradient equal, as the layouts are."""
    monkeypatch.setenv("KPOP_KERNELS", "triton")
    N, D, I, E, k = 24, 32, 24, 5, 2
    ids = routed(N, E, k, hot=1, cold=4)
    leaves = problem(N, D, I, E, k, torch.float32)
    dout = torch.randn(N, D, device=DEV)
    out, grads = run(moe_ffn, ids, leaves, dout)
    monkeypatch.setattr(msort, "SMALL_ROWS", 0)
    out_t, grads_t = run(moe_ffn, ids, leaves, dout)
    assert torch.equal(out, out_t) and all(torch.equal(a, b) for a, b in zip(grads, grads_t))


def slot_outputs(N: int, K: int, D: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, K, D] expert outputs over six decades: fp32 sums that depend on the order of the adds."""
    scale = 10.0 ** torch.randint(-3, 3, (N, K, D), device=DEV)
    return (torch.randn(N, K, D, device=DEV) * scale).to(dtype)


@pytest.mark.parametrize("K", [1, 3, 4, 6, 8, 15])
def test_sum_slots_adds_in_torchs_cuda_order(K):
    """The combine kernel's fp32 sums equal the reference order's bit for bit (and the rounding to
    fp16 is one rounding of them); the data is such that summing j = 0..K-1 in turn differs."""
    from kernels.moe.grouped import sum_slots

    torch.manual_seed(K)
    N, D = 5, 1100  # two column blocks, the second partial
    for dtype in (torch.float32, torch.float16):
        y = slot_outputs(N, K, D, dtype)
        ref = sum_slots_ref(y)
        assert torch.equal(sum_slots(y, torch.float32), ref)
        assert torch.equal(sum_slots(y, dtype), ref.to(dtype))
        if K > 4:
            in_turn = torch.zeros(N, D, device=DEV)
            for j in range(K):
                in_turn = in_turn + y[:, j].float()
            assert not torch.equal(in_turn, ref)  # the order is what the test checks


def test_sum_slots_keeps_torchs_sum_where_torch_adds_in_another_order():
    from kernels.moe.grouped import sum_slots

    y = slot_outputs(3, 16, 40, torch.float32)  # K >= 16: torch splits the slots across threads
    assert torch.equal(sum_slots(y, torch.float32), y.sum(1, dtype=torch.float32))
    y = slot_outputs(3, 8, 1, torch.float32)  # D = 1: a reduction across lanes
    assert torch.equal(sum_slots(y, torch.float32), y.sum(1, dtype=torch.float32))


def test_bad_arguments_are_named():
    x, w, wg, wu, wd = problem(4, 8, 6, 3, 2, torch.float32)
    ids = torch.zeros(4, 2, dtype=torch.long, device=DEV)
    with pytest.raises(ValueError, match=r"x must be \[N, D\]"):
        moe_ffn(x[None], ids, w, wg, wu, wd)
    with pytest.raises(ValueError, match="w_down must be"):
        moe_ffn(x, ids, w, wg, wu, wd.transpose(1, 2))
    with pytest.raises(ValueError, match="ids must be an integer"):
        moe_ffn(x, ids.float(), w, wg, wu, wd)
    with pytest.raises(ValueError, match="weights must be a float tensor shaped like ids"):
        moe_ffn(x, ids, w[:, :1], wg, wu, wd)
    with pytest.raises(ValueError, match="one float dtype"):
        moe_ffn(x, ids, w, wg.double(), wu, wd)
    with pytest.raises(ValueError, match="one matrix per expert"):
        moe_ffn(x, ids, w, wg, wu[:2], wd)


SMEM_BODY = '''
    from kernels.moe import grouped as g

    # sizes multiples of 16 at real shapes (D 2048, I 512), as the runtime specialises them
    ALIGNED = ("D", "I", "ld_left", "ld_right", "P", "Q", "I_SILU")
    for dt, t in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        cfg = g.launch_config(dt)
        base = dict(E=256, EP=256, TOPK=8, UPCAST=False, PREC="ieee" if dt == torch.float32 else "tf32")
        idx = dict(order="*i32", counts="*i32", offsets="*i32", weights="*fp32", D="i32", I="i32", NB="i32")
        kernels = {
            "gate_up_fwd": (g._gate_up_fwd, dict(x=f"*{t}", wg=f"*{t}", wu=f"*{t}", h=f"*{t}", gu=f"*{t}"), dict(SAVE=True)),
            "down_fwd": (g._down_fwd, dict(h=f"*{t}", wd=f"*{t}", y=f"*{t}"), {}),
            "down_bwd_dh": (g._down_bwd_dh, dict(dout=f"*{t}", wd=f"*{t}", gu=f"*{t}", dgu=f"*{t}", dw_part="*fp32"), {}),
            "gate_up_bwd_dx": (g._gate_up_bwd_dx, dict(dgu=f"*{t}", wg=f"*{t}", wu=f"*{t}", dx=f"*{t}"), {}),
        }
        for name, (fn, sig, extra) in kernels.items():
            BM, BN, BK, w, s = cfg[name]
            out[f"{name} {t}"] = shared(fn, {**idx, **sig}, dict(base, BM=BM, BN=BN, BK=BK, **extra), w, s, ALIGNED)
        BM, BN, BK, w, s = cfg["wgrad"]
        sig = dict(left=f"*{t}", right=f"*{t}", dw=f"*{t}", ld_left="i32", left_col0="i32", ld_right="i32",
                   P="i32", Q="i32", I_SILU="i32", **idx)
        for uses in (dict(LEFT_BY_TOKEN=True, SCALE_LEFT=True, RIGHT_BY_TOKEN=False, RIGHT_SILU=True),
                     dict(LEFT_BY_TOKEN=False, SCALE_LEFT=False, RIGHT_BY_TOKEN=True, RIGHT_SILU=False)):
            key = "wgrad down" if uses["RIGHT_SILU"] else "wgrad gate_up"
            out[f"{key} {t}"] = shared(g._wgrad, sig, dict(base, BM=BM, BN=BN, BK=BK, **uses), w, s, ALIGNED)

    # the counting sort at bench-2b's 32 experts, Ring-2.6-1T's 256 and a tiny padded E
    from kernels.moe import sort as srt
    for E in (6, 32, 256):
        EP, BLOCK = srt.launch_config(E)
        sig = dict(ids="*i64", order="*i32", counts="*i32", offsets="*i32", M="i32")
        consts = dict(E=E, EP=EP, BLOCK=BLOCK, HIST=srt.HIST)
        out[f"sort_by_expert E{E}"] = shared(srt._sort_by_expert, sig, consts, srt.WARPS, 1)
    for t in ("bf16", "fp32"):
        out[f"sum_slots {t}"] = shared(g._sum_slots, dict(y=f"*{t}", out=f"*{t}", D="i32"), dict(K=8, BD=g.SUM_BD), 4, 1,
                                       ("D",))
'''


@pytest.mark.slow
def test_launch_configs_compile_for_sm90_within_shared_memory():
    """Every MoE kernel, both dtypes' tiles (and the counting sort at three expert counts, the slot sum), compiled for sm_90 on the CPU down to LLVM IR (a config
    over Hopper's shared memory would only fail at launch on the GPU)."""
    pytest.importorskip("triton.compiler.compiler")
    assert_fit(shared_memory(SMEM_BODY), 2 * 6 + 3 + 2)
