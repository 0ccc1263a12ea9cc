"""Small architectures with every Ring-2.6 feature, for the CPU quickstart and the tests, and the
GPU benchmark's 2B shape (`bench-2b`)."""

from __future__ import annotations

from typing import Any

from kpop.policy.config import BailingHybridConfig


def tiny_arch(vocab_size: int = 1024, **overrides: Any) -> dict[str, Any]:
    """HF `bailing_hybrid` fields of a ~1M-parameter model: 8 layers, MLA at layers 3 and 7
    (layer_group_size 4), Lightning elsewhere, 1 dense layer then MoE (8 experts in 4 groups,
    top-2 of the best 2 groups), q LoRA, 1 MTP layer. Usable as `policy.arch` in a run config."""
    arch: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        layer_group_size=4,
        num_attention_heads=4,
        head_dim=16,
        group_norm_size=2,
        partial_rotary_factor=0.5,
        use_qk_norm=True,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        num_experts=8,
        num_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=1,
        mtp_loss_scaling_factor=0.1,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
    )
    arch.update(overrides)
    return arch


def small_arch(vocab_size: int = 1024, **overrides: Any) -> dict[str, Any]:
    """The quickstart's ~1.6M-parameter model: the tiny preset twice as wide and half as deep
    (Lightning, MLA, Lightning, MLA; 1 dense layer then MoE). At the same CPU cost per step it
    learns to copy numbers from the prompt into a tool call several times faster than the tiny
    one, which two Lightning layers before each softmax layer do not help with."""
    arch = tiny_arch(vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4, layer_group_size=2,
                     head_dim=32, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                     v_head_dim=32, moe_intermediate_size=64)
    arch.update(overrides)
    return arch


BENCH_2B_VOCAB = 32000


def bench_2b_arch(vocab_size: int = BENCH_2B_VOCAB, **overrides: Any) -> dict[str, Any]:
    """The GPU benchmark's Ring-2.6 shape: 2.02B parameters, 0.89B active per token. 16 layers in
    groups of 4 (MLA at layers 3, 7, 11, 15, Lightning elsewhere), 16 heads of 128, the real MLA
    dims (q LoRA 768, kv LoRA 512, nope 128, rope 64, v 128), layer 0 dense (5,632), then MoE:
    32 experts in 8 groups, top-8 of the best 4 groups, 1 shared expert, 512 wide; no MTP layer.
    The vocabulary is 32,000 whatever the tokenizer, which must fit in it."""
    if vocab_size > BENCH_2B_VOCAB:
        raise ValueError(f"policy preset 'bench-2b' has a {BENCH_2B_VOCAB}-token vocabulary; the tokenizer has {vocab_size}")
    arch = tiny_arch(
        BENCH_2B_VOCAB,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        layer_group_size=4,
        num_attention_heads=16,
        head_dim=128,
        group_norm_size=4,
        q_lora_rank=768,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        num_experts=32,
        n_group=8,
        topk_group=4,
        num_experts_per_tok=8,
        num_shared_experts=1,
        moe_intermediate_size=512,
        first_k_dense_replace=1,
        num_nextn_predict_layers=0,
        mtp_loss_scaling_factor=0.0,
        max_position_embeddings=8192,
    )
    arch.update(overrides)
    return arch


PRESETS = {"tiny": tiny_arch, "small": small_arch, "bench-2b": bench_2b_arch}


def preset_arch(name: str, vocab_size: int = 1024) -> dict[str, Any]:
    """The named preset's fields for a tokenizer of `vocab_size` tokens."""
    if name not in PRESETS:
        raise ValueError(f"unknown policy preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name](vocab_size)


def tiny_config(vocab_size: int = 1024, **overrides: Any) -> BailingHybridConfig:
    return BailingHybridConfig(**tiny_arch(vocab_size, **overrides))
