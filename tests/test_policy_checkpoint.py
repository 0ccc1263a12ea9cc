"""HF-format checkpoints of the policy (kpop/policy/checkpoint.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from kpop.config import PolicyConfig
from kpop.policy.checkpoint import CheckpointError, build_model, load_checkpoint, load_policy, save_checkpoint
from kpop.policy.presets import tiny_arch, tiny_config

VOCAB = 96
IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()  # tiny ops: threads only add OpenMP spinning on a shared box
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _logits(model) -> torch.Tensor:
    return model.eval()(IDS).logits


def test_save_load_round_trip_single_and_sharded(tmp_path):
    model = build_model(tiny_config(VOCAB), seed=1)
    with torch.no_grad():
        model.model.layers[1].mlp.gate.expert_bias.uniform_(-0.1, 0.1)  # buffers travel too
    ref = _logits(model)
    single = save_checkpoint(model, tmp_path / "one")
    assert (single / "model.safetensors").is_file() and not (single / "model.safetensors.index.json").exists()
    sharded = save_checkpoint(model, tmp_path / "many", max_shard_bytes=300_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    for path in (single, sharded):
        assert json.loads((path / "config.json").read_text())["architectures"] == ["BailingMoeV2_5ForCausalLM"]
        loaded = load_checkpoint(path)
        assert torch.equal(_logits(loaded), ref)
        assert torch.equal(loaded.model.layers[1].mlp.gate.expert_bias, model.model.layers[1].mlp.gate.expert_bias)
    # re-saving unsharded removes the stale shards
    save_checkpoint(model, tmp_path / "many")
    assert sorted(p.name for p in (tmp_path / "many").glob("*.safetensors")) == ["model.safetensors"]


def test_bf16_save_and_dtype_on_load(tmp_path):
    model = build_model(tiny_config(VOCAB), seed=2)
    save_checkpoint(model, tmp_path, dtype="bfloat16")
    loaded = load_checkpoint(tmp_path, dtype="bfloat16")
    assert loaded.model.word_embeddings.weight.dtype == torch.bfloat16
    assert loaded.lm_head.weight.dtype == torch.float32  # fp32 LM head is kept
    out = _logits(loaded)
    assert out.dtype == torch.float32
    assert (out - _logits(model)).abs().max() < 0.05


def _hf_tensor_shapes(a: dict) -> dict[str, tuple[int, ...]]:
    """The HF `BailingMoeV2_5ForCausalLM` weight names, spelled out independently of our model."""
    D, V, H, hd = a["hidden_size"], a["vocab_size"], a["num_attention_heads"], a["head_dim"]
    L, g, mtp = a["num_hidden_layers"], a["layer_group_size"], a["num_nextn_predict_layers"]
    qr, r, rope = a["q_lora_rank"], a["kv_lora_rank"], a["qk_rope_head_dim"]
    dqk, vd = a["qk_nope_head_dim"] + rope, a["v_head_dim"]
    shapes = {"model.word_embeddings.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for l in range(L + mtp):
        p = f"model.layers.{l}."
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        if l >= L:
            shapes.update({p + "enorm.weight": (D,), p + "hnorm.weight": (D,), p + "eh_proj.weight": (D, 2 * D),
                           p + "final_layernorm.weight": (D,)})
        if l >= L or (l + 1) % g == 0:
            shapes.update({
                p + "attention.q_a_proj.weight": (qr, D), p + "attention.q_a_layernorm.weight": (qr,),
                p + "attention.q_b_proj.weight": (H * dqk, qr),
                p + "attention.kv_a_proj_with_mqa.weight": (r + rope, D), p + "attention.kv_a_layernorm.weight": (r,),
                p + "attention.kv_b_proj.weight": (H * (a["qk_nope_head_dim"] + vd), r),
                p + "attention.dense.weight": (D, H * vd),
            })
        else:
            shapes.update({
                p + "attention.query_key_value.weight": (3 * H * hd, D),
                p + "attention.query_layernorm.weight": (hd,), p + "attention.key_layernorm.weight": (hd,),
                p + "attention.g_proj.weight": (H * hd, D), p + "attention.g_norm.weight": (H * hd,),
                p + "attention.dense.weight": (D, H * hd),
            })
        mlps = []
        if l < a["first_k_dense_replace"]:
            mlps.append((p + "mlp.", a["intermediate_size"]))
        else:
            shapes[p + "mlp.gate.weight"] = (a["num_experts"], D)
            shapes[p + "mlp.gate.expert_bias"] = (a["num_experts"],)
            mlps += [(p + f"mlp.experts.{e}.", a["moe_intermediate_size"]) for e in range(a["num_experts"])]
            mlps.append((p + "mlp.shared_experts.", a["moe_intermediate_size"] * a["num_shared_experts"]))
        for q, inter in mlps:
            shapes.update({q + "gate_proj.weight": (inter, D), q + "up_proj.weight": (inter, D),
                           q + "down_proj.weight": (D, inter)})
    return shapes


def _write_hf_checkpoint(path, arch: dict, drop: str | None = None, extra: str | None = None,
                         reshape: str | None = None) -> dict[str, torch.Tensor]:
    """What an HF export looks like: bf16 shards, an index, config.json with remote-code fields."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    tensors = {n: (torch.randn(s, generator=g) * 0.05).to(torch.bfloat16) for n, s in _hf_tensor_shapes(arch).items()}
    if drop:
        del tensors[drop]
    if extra:
        tensors[extra] = torch.zeros(3, dtype=torch.bfloat16)
    if reshape:
        tensors[reshape] = torch.zeros(5, 5, dtype=torch.bfloat16)
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = dict(arch, model_type="bailing_hybrid", architectures=["BailingMoeV2_5ForCausalLM"],
                  auto_map={"AutoConfig": "configuration_bailing_moe_v2_5.BailingMoeV2_5Config"},
                  torch_dtype="bfloat16", qk_head_dim=arch["qk_nope_head_dim"] + arch["qk_rope_head_dim"])
    (path / "config.json").write_text(json.dumps(config))
    return tensors


def test_checkpoint_with_hf_names_loads(tmp_path):
    arch = tiny_arch(VOCAB)
    tensors = _write_hf_checkpoint(tmp_path, arch)
    model = load_checkpoint(tmp_path)
    state = model.state_dict()
    assert set(state) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(state[name], t.float()), name
    assert torch.isfinite(_logits(model)).all()


@pytest.mark.parametrize(
    "kind, name, message",
    [
        ("drop", "model.layers.3.attention.kv_b_proj.weight", "missing 1 tensors ['model.layers.3.attention.kv_b_proj.weight']"),
        ("extra", "model.layers.0.attention.rotary_emb.inv_freq", "unexpected 1 tensors ['model.layers.0.attention.rotary_emb.inv_freq']"),
        ("reshape", "model.layers.5.mlp.gate.weight", "model.layers.5.mlp.gate.weight: file (5, 5) vs model (8, 64)"),
    ],
)
def test_mismatched_checkpoint_names_the_tensor(tmp_path, kind, name, message):
    _write_hf_checkpoint(tmp_path, tiny_arch(VOCAB), **{kind: name})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    assert message in str(err.value)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)
    build_model(tiny_config(VOCAB)).config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors and no model.safetensors.index.json"):
        load_checkpoint(tmp_path)


def test_load_policy_from_arch_and_from_checkpoint(tmp_path):
    cfg = PolicyConfig(arch=tiny_arch(), dtype="float32")
    model, tok = load_policy(cfg, seed=3)
    again, _ = load_policy(cfg, seed=3)
    assert model.config.vocab_size == len(tok)  # vocab_size from the tokenizer when not given
    assert torch.equal(_logits(model), _logits(again))  # same seed -> same init on every process
    save_checkpoint(model, tmp_path)
    loaded, _ = load_policy(PolicyConfig(checkpoint=tmp_path, dtype="bfloat16", fp32_lm_head=True))
    assert loaded.model.layers[0].attention.query_key_value.weight.dtype == torch.bfloat16
    assert loaded.lm_head.weight.dtype == torch.float32
    with pytest.raises(ValueError, match=r"policy.arch: unknown bailing_hybrid field\(s\) \['hiden_size'\]"):
        load_policy(PolicyConfig(arch={"hiden_size": 64}))
    with pytest.raises(ValueError, match="policy.arch.*num_experts_per_tok"):
        load_policy(PolicyConfig(arch=tiny_arch(num_experts_per_tok=7)))
    small, _ = load_policy(PolicyConfig(preset="small"))  # an empty arch takes the named preset
    assert small.config.hidden_size == 128 and small.config.num_hidden_layers == 4


def test_hf_from_pretrained_reads_our_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_model(tiny_config(VOCAB), seed=4)
    save_checkpoint(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(hf.state_dict().values(), model.state_dict().values()))
    # same weights; HF may lay tensors out differently in memory, so GEMMs round differently
    torch.testing.assert_close(_logits(hf), _logits(model), atol=1e-6, rtol=1e-6)
