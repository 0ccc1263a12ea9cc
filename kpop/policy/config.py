"""`BailingHybridConfig`: the HF config of Ring-2.6 / Ling-2.6 (`model_type: bailing_hybrid`).

Field names are those of inclusionAI's `configuration_bailing_moe_v2_5.py`, so a real checkpoint's
`config.json` loads unchanged. One field is ours: `linear_decay_offset`, because references
disagree on the per-layer Lightning decay factor `1 - (l - offset)/(L - 1) + 1e-5`: the HF remote
code uses offset 1 (`l - 1`), vLLM / SGLang-GPU use 0 (`l`). Default 1 = the checkpoint's own code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, PretrainedConfig


@strict
class BailingHybridConfig(PretrainedConfig):
    model_type = "bailing_hybrid"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 157184
    hidden_size: int = 2048
    intermediate_size: int = 5120
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 4  # unused: Lightning is MHA, MLA has its own latent KV
    hidden_act: str = "silu"
    use_qkv_bias: bool = False
    use_bias: bool = False
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    output_dropout: float = 0.0
    initializer_range: float = 0.02
    max_position_embeddings: int = 32768
    rope_theta: float = 600000.0
    rope_scaling: dict | None = None  # YaRN: {"type"/"rope_type": "yarn", "factor", "mscale_all_dim", ...}
    use_cache: bool = True
    max_window_layers: int | None = 20
    pad_token_id: int | None = 156892
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 156892
    # MoE
    num_experts: int | None = 256
    num_shared_experts: int | None = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    moe_intermediate_size: int = 512
    first_k_dense_replace: int = 1
    routed_scaling_factor: float = 1.0
    moe_router_enable_expert_bias: bool = True
    score_function: str = "sigmoid"
    scoring_func: str = "sigmoid"
    seq_aux: bool = True
    topk_method: str = "noaux_tc"
    router_dtype: str | None = "fp32"
    output_router_logits: bool = False
    # MTP
    num_nextn_predict_layers: int = 0
    mtp_loss_scaling_factor: float = 0.0
    # Lightning linear attention
    head_dim: int | None = 128
    use_qk_norm: bool = True
    layer_group_size: int = 5
    group_norm_size: int = 4
    linear_silu: bool = False  # not read by the HF reference modeling code; kept for config.json parity
    partial_rotary_factor: float = 0.5
    linear_decay_offset: int = 1
    # MLA
    kv_lora_rank: int = 512
    q_lora_rank: int | None = None
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    rope_interleave: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        kwargs.pop("qk_head_dim", None)  # derived; old configs store it
        super().__post_init__(**kwargs)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def check_architecture(self) -> None:
        """Raise ValueError naming the field when the numbers cannot build a model."""
        L, g = self.num_hidden_layers, self.layer_group_size
        problems = []
        if L < 1 or g < 1:
            problems.append(f"num_hidden_layers ({L}) and layer_group_size ({g}) must be >= 1")
        if self.num_experts:
            if self.num_experts % self.n_group:
                problems.append(f"num_experts ({self.num_experts}) must be divisible by n_group ({self.n_group})")
            elif self.num_experts // self.n_group < 2:
                problems.append("each expert group needs >= 2 experts (group score = sum of its top-2)")
            if not 1 <= self.topk_group <= self.n_group:
                problems.append(f"topk_group ({self.topk_group}) must be in [1, n_group={self.n_group}]")
            if self.num_experts_per_tok > self.topk_group * (self.num_experts // max(self.n_group, 1)):
                problems.append(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts in topk_group groups")
        if (self.num_attention_heads * self.head_dim) % self.group_norm_size:
            problems.append(f"num_attention_heads*head_dim must be divisible by group_norm_size ({self.group_norm_size})")
        rope = int(self.head_dim * self.partial_rotary_factor)
        if rope % 2 or rope > self.head_dim:
            problems.append(f"head_dim*partial_rotary_factor ({rope}) must be even and <= head_dim")
        if self.qk_rope_head_dim % 2:
            problems.append(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even")
        if problems:
            raise ValueError("bailing_hybrid config: " + "; ".join(problems))

    def mixer_types(self) -> list[str]:
        """'attention' (MLA) or 'linear_attention' (Lightning) for each of the main layers."""
        L, g = self.num_hidden_layers, self.layer_group_size
        return [
            "attention" if (l + 1) % g == 0 or l >= (L // g) * g else "linear_attention"
            for l in range(L)
        ]


def config_from_arch(arch: dict[str, Any], source: str = "policy.arch") -> BailingHybridConfig:
    """A config from user-written fields; unknown or ill-typed fields are errors naming them
    (a checkpoint's config.json, by contrast, may carry extra keys and is read leniently)."""
    known = {f.name for f in dataclasses.fields(BailingHybridConfig)}
    unknown = sorted(set(arch) - known)
    if unknown:
        raise ValueError(f"{source}: unknown bailing_hybrid field(s) {unknown}")
    try:
        config = BailingHybridConfig(**arch)
        config.check_architecture()
    except (TypeError, ValueError, StrictDataclassError) as exc:
        raise ValueError(f"{source}: {exc}") from None
    return config


AutoConfig.register("bailing_hybrid", BailingHybridConfig, exist_ok=True)
