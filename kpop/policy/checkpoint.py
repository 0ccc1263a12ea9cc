"""HF-format checkpoints of the policy: `config.json` + safetensors (one file, or shards with
`model.safetensors.index.json`), and `load_policy(PolicyConfig) -> (model, tokenizer)`.

Loading builds the model on the meta device (no memory, no init cost at any size), materialises
it on the target device, then fills every tensor from the files; any missing, unexpected or
mis-shaped tensor is an error that names it. Non-persistent buffers (RoPE frequencies,
Lightning decays) are recomputed from the config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kpop.policy.config import BailingHybridConfig, config_from_arch
from kpop.policy.model import BailingMoeV2_5ForCausalLM

if TYPE_CHECKING:
    from kpop.config import PolicyConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint directory that does not match the model; the message names the tensors."""


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def save_checkpoint(
    model: BailingMoeV2_5ForCausalLM,
    path: str | Path,
    max_shard_bytes: int = 4 << 30,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Write `config.json` and the weights (sharded above `max_shard_bytes`) to `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = _as_dtype(dtype)
    # as HF's save_pretrained does: vLLM and AutoModel pick the model class from this field
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(path)
    state = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        if dtype is not None and t.is_floating_point() and not (name == "lm_head.weight" and model.fp32_lm_head):
            t = t.to(dtype)
        state[name] = t.contiguous().cpu()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    for old in list(path.glob("model*.safetensors")) + [path / INDEX_NAME]:
        old.unlink(missing_ok=True)  # a smaller re-save must not leave stale shards behind
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(path / SINGLE_NAME), metadata=meta)
        return path
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata=meta)
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return path


def _weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> file holding it."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        missing_files = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing_files:
            raise CheckpointError(f"{path}: index names shard files that do not exist: {missing_files}")
        return {name: path / f for name, f in weight_map.items()}
    single = path / SINGLE_NAME
    if not single.is_file():
        raise CheckpointError(f"{path}: no {SINGLE_NAME} and no {INDEX_NAME}")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def load_config(path: str | Path) -> BailingHybridConfig:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json (not an HF checkpoint directory)")
    raw = json.loads(cfg_file.read_text())
    if raw.get("model_type") not in (None, "bailing_hybrid"):
        raise CheckpointError(f"{cfg_file}: model_type is {raw.get('model_type')!r}, expected 'bailing_hybrid'")
    raw.pop("model_type", None)
    raw.pop("auto_map", None)  # remote-code pointers; this class is registered locally
    return BailingHybridConfig(**raw)


def build_model(
    config: BailingHybridConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    init: bool = True,
    seed: int | None = 0,
) -> BailingMoeV2_5ForCausalLM:
    """The model for `config` on `device`. `init=False` leaves weights uninitialised (they will be
    loaded); `seed` makes a from-scratch init identical on every process (learner, rollout)."""
    dtype = _as_dtype(dtype)
    with torch.device("meta"):
        model = BailingMoeV2_5ForCausalLM(config)
    # a from-scratch init draws from the CPU generator so every device gets the same weights
    model.to_empty(device="cpu" if init else device)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        for module in model.modules():
            if init:
                model._init_weights(module)
            elif hasattr(module, "reset_buffers"):
                module.reset_buffers()
    model.to(device)
    if dtype is not None:
        set_dtype(model, dtype)
    return model


def set_dtype(model: BailingMoeV2_5ForCausalLM, dtype: torch.dtype) -> None:
    """Cast parameters to `dtype`; the LM head stays fp32 when `model.fp32_lm_head`. Buffers
    (expert bias, RoPE frequencies, Lightning decays) are not parameters and stay fp32."""
    for name, p in model.named_parameters():
        if not (name == "lm_head.weight" and model.fp32_lm_head):
            p.data = p.data.to(dtype)


def load_checkpoint(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
) -> BailingMoeV2_5ForCausalLM:
    """Load an HF `bailing_hybrid` checkpoint directory. Parameters are fp32 whatever the stored
    dtype unless `dtype` is given (e.g. "bfloat16" to serve or train in bf16)."""
    path = Path(path)
    config = load_config(path)
    model = build_model(config, device=device, init=False)
    files = _weight_files(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: checkpoint does not match the config: "
            f"missing {len(missing)} tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
            f"unexpected {len(unexpected)} tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    bad_shapes = []
    with torch.no_grad():
        for f, names in by_file.items():
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in names:
                    t = st.get_tensor(name)
                    target = expected[name]
                    if tuple(t.shape) != tuple(target.shape):
                        bad_shapes.append(f"{name}: file {tuple(t.shape)} vs model {tuple(target.shape)}")
                        continue
                    target.copy_(t.to(target.dtype))
    if bad_shapes:
        raise CheckpointError(f"{path}: mis-shaped tensors: " + "; ".join(bad_shapes[:8]))
    dtype = _as_dtype(dtype)
    if dtype is not None:
        set_dtype(model, dtype)
    return model


def load_policy(cfg: "PolicyConfig", device: torch.device | str = "cpu", seed: int = 0):
    """(model, tokenizer) for a run config's `policy` section.

    `checkpoint` set: load it (its config wins over `arch`). Otherwise build from `arch` (HF
    fields); an empty `arch` means the named `preset`. A missing `vocab_size` takes the tokenizer's.
    `tokenizer` set: load that directory; otherwise the locally trained BPE tokenizer.
    """
    from kpop.policy.presets import preset_arch
    from kpop.policy.tokenizer import get_tokenizer, load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer is not None else get_tokenizer()
    if cfg.checkpoint is not None:
        model = load_checkpoint(cfg.checkpoint, device=device)
    else:
        arch = dict(cfg.arch) if cfg.arch else preset_arch(cfg.preset, len(tokenizer))
        arch.setdefault("vocab_size", len(tokenizer))
        arch.setdefault("pad_token_id", tokenizer.pad_token_id)
        arch.setdefault("eos_token_id", tokenizer.eos_token_id)
        config = config_from_arch(arch)
        model = build_model(config, device=device, seed=seed)
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(
            f"policy: tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}"
        )
    model.fp32_lm_head = cfg.fp32_lm_head
    set_dtype(model, DTYPES[cfg.dtype])
    return model, tokenizer
