"""The policy on CUDA through the Triton kernels (kernels/ dispatches to Triton for CUDA tensors).
Skipped without a GPU. Shapes use the real MLA/Lightning head sizes (576/512 latent, head_dim 128)."""

from __future__ import annotations

import pytest
import torch

from kpop.policy.cache import HybridCache
from kpop.policy.checkpoint import build_model
from kpop.policy.presets import tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REAL_HEADS = dict(hidden_size=256, num_attention_heads=4, head_dim=128, group_norm_size=4, q_lora_rank=128,
                  kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                  intermediate_size=512, moe_intermediate_size=128)


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def test_cuda_fp32_matches_cpu_reference():
    cpu = build_model(tiny_config(256, **REAL_HEADS), seed=0).eval()
    gpu = build_model(tiny_config(256, **REAL_HEADS), seed=0, device="cuda").eval()
    ids = torch.randint(0, 256, (1, 150), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, 70, 150], dtype=torch.int32)
    with torch.no_grad():
        ref = cpu(ids, cu_seqlens=cu).logits
        got = gpu(ids.cuda(), cu_seqlens=cu.cuda()).logits.cpu()
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("block_size", [16, 64])  # 64: whole-tile pages, the Gluon MLA decode on sm_90
def test_cuda_bf16_cache_decode_matches_forward(block_size):
    # every expert routed: top-k routing is discontinuous, and at a near-tie bf16 rounding in the
    # cached path can pick another expert (measured on the H200: one position, drift 0.048, with
    # either kernel set). That is routing, not attention; this test is about the attention caches.
    model = build_model(tiny_config(256, **REAL_HEADS, num_experts_per_tok=8, topk_group=4), seed=0, device="cuda",
                        dtype="bfloat16").eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).cuda() for n in (33, 80, 5)]
    with torch.no_grad():
        full = [model(p[None]).logits[0] for p in prompts]
    cache = HybridCache.for_model(model, max_seqs=4, num_blocks=64, block_size=block_size)
    slots = [cache.allocate() for _ in prompts]
    cut = [n - 4 for n in (33, 80, 5)]
    out = model.forward_step(torch.cat([p[:c] for p, c in zip(prompts, cut)]), slots, cut, cache)
    errs = [(out[i] - full[i][cut[i] - 1]).abs().max().item() for i in range(3)]
    for t in range(4):
        out = model.forward_step(torch.stack([p[c + t] for p, c in zip(prompts, cut)]), slots, [1, 1, 1], cache)
        errs += [(out[i] - full[i][cut[i] + t]).abs().max().item() for i in range(3)]
    scale = max(f.abs().max().item() for f in full)
    assert max(errs) < 0.03 * scale, (max(errs), scale)


def test_cuda_backward_through_packed_batch_matches_cpu_reference():
    """Gradients of a packed two-sequence loss through the GPU kernels (Triton forward and
    backward) against the CPU reference (pure-torch kernels), same weights, fp32, every parameter.

    Every expert is routed: top-k routing is discontinuous, so a near-tie could send a token to
    another expert on one device and the expert gradients would differ for a reason that is not
    a kernel's. Bound: Triton runs fp32 dots in TF32 (10-bit mantissa, eps 2^-10) and the
    backward chains a few of them per layer, so each gradient tensor may differ by 8 TF32 eps
    relative to its norm; a wrong backward (a missing term, a swapped index) is off by O(1).
    """
    cfg = tiny_config(256, **REAL_HEADS, num_experts_per_tok=8, topk_group=4)
    ids = torch.randint(0, 256, (1, 128), generator=torch.Generator().manual_seed(3))
    cu = torch.tensor([0, 50, 128], dtype=torch.int32)
    grads = {}
    for device in ("cpu", "cuda"):
        model = build_model(cfg, seed=0, device=device).train()
        model(ids.to(device), labels=ids.to(device), cu_seqlens=cu.to(device)).loss.backward()
        grads[device] = {n: None if p.grad is None else p.grad.detach().float().cpu() for n, p in model.named_parameters()}
    ref, got = grads["cpu"], grads["cuda"]
    assert [n for n, g in got.items() if g is None] == [n for n, g in ref.items() if g is None]
    reached = [n for n, g in ref.items() if g is not None]
    assert any(".experts." in n for n in reached) and any("attention" in n for n in reached)
    tol = 8 * 2.0**-10
    for name in reached:
        assert torch.isfinite(got[name]).all(), name
        diff, norm = float((got[name] - ref[name]).norm()), float(ref[name].norm())
        assert diff <= tol * norm + 1e-6, f"{name}: |grad_cuda - grad_cpu| = {diff:.3g}, bound {tol:.3g} x {norm:.3g}"


def test_embedded_engine_on_cuda_pages_of_64_and_greedy_matches_forward():
    """The engine's GPU default page (64 tokens) and its decode loop through the GPU kernels:
    greedy tokens equal the argmax of a full forward over the growing sequence."""
    from kpop.rollout.embedded import EmbeddedEngine
    from kpop.rollout.engine import GenerationRequest, SamplingParams

    model = build_model(tiny_config(256, **REAL_HEADS), seed=0, device="cuda").eval()
    engine = EmbeddedEngine(model, max_seqs=4)
    try:
        assert engine.cache.block_size == 64
        prompt = torch.randint(2, 256, (70,), generator=torch.Generator().manual_seed(2)).tolist()
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        out = engine.generate([GenerationRequest(prompt_token_ids=prompt, params=params)])[0].token_ids
    finally:
        engine.close()
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq], device="cuda")).logits[0, -1].argmax()))
    assert out == seq[len(prompt):]


def _loop_moe_ffn(x, ids, weights, w_gate, w_up, w_down):
    from kernels.moe import moe_loop

    return moe_loop(x, ids, weights, *(torch.stack(list(w)) for w in (w_gate, w_up, w_down)))


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_forward_backward_with_the_moe_kernel_matches_the_expert_loop(monkeypatch, dtype, tol):
    """The whole policy on CUDA, the routed experts through the grouped kernel vs the per-expert loop
    it replaced (attention on the Triton kernels in both): logits and every parameter's gradient.
    Every expert is routed for bf16: near-tied scores could pick other experts after rounding."""
    import kpop.policy.model as pm

    extra = dict(num_experts_per_tok=8, topk_group=4) if dtype == "bfloat16" else {}
    model = build_model(tiny_config(256, **REAL_HEADS, **extra), seed=0, device="cuda", dtype=dtype).train()
    ids = torch.randint(0, 256, (1, 160), device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    cu = torch.tensor([0, 90, 160], dtype=torch.int32, device="cuda")

    def run():
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids, cu_seqlens=cu)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()

    logits, grads = run()
    monkeypatch.setattr(pm, "moe_ffn", _loop_moe_ffn)
    ref_logits, ref_grads = run()
    assert rel(logits, ref_logits) < tol
    assert set(ref_grads) <= set(grads)  # the kernel also gives unrouted experts a (zero) gradient
    if dtype == "float32":
        for n, g in ref_grads.items():
            assert rel(grads[n], g) < tol or g.abs().max() < 1e-8, (n, rel(grads[n], g))
        return
    # bf16: both paths round differently at every layer, so a gradient deep in the stack can differ by a
    # few percent between them. The bound that matters: the kernel is no further from the fp32 truth
    # (the same weights, the loop in fp32) than the loop it replaced.
    model.float()
    truth_logits, truth = run()
    assert rel(logits, truth_logits) <= 1.5 * rel(ref_logits, truth_logits) + 1e-3
    for n, g in truth.items():
        if g.abs().max() < 1e-8 or n not in ref_grads:
            continue
        k, loop = rel(grads[n], g), rel(ref_grads[n], g)
        assert k <= 1.5 * loop + tol / 4, (n, k, loop)


def test_moe_block_trains_and_replays_without_host_sync():
    """The MoE block's forward and backward on CUDA, natural and replayed routing, under CUDA's sync
    debug mode set to error (the old loop read every expert's token list back to the host)."""
    model = build_model(tiny_config(256, **REAL_HEADS), seed=0, device="cuda", dtype="bfloat16").train()
    block = model.model.layers[1].mlp
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    block(x).float().sum().backward()  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, ids = block(x, return_expert_ids=True)
        y.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    y2 = block(x.detach(), expert_ids=ids)  # replay (checks the ids: one read, allowed)
    torch.testing.assert_close(y2, y.detach(), atol=0, rtol=0)
    assert int(block.gate.expert_load.sum()) == 3 * 300 * model.config.num_experts_per_tok
