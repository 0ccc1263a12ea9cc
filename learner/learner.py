"""The DeepSpeed learner: trajectories in, one optimiser step out, versioned weights and checkpoints.

    learner = Learner(cfg.learner, cfg.algorithm, model, total_steps=cfg.schedule.rl_steps)
    metrics = learner.train_step(trajectories)       # one optimiser step, version += 1
    with learner.weights() as state:                 # on the learner's device, for a weight sync
        handle = sync.publish(state, learner.version)
    learner.save(run_dir / "ckpt", extra={"acked": ids})
    extra = Learner(...).load(run_dir / "ckpt")      # continues bit-identically

One `train_step` is one optimiser step: the batch is packed into micro-batches under
`micro_batch_tokens`, each is forwarded and backpropagated with the loss normalised over the
whole batch, then DeepSpeed steps once. Because the weights do not move between micro-batches,
the logprobs of that same forward, detached, are exactly the proximal policy pi_theta_old of the
decoupled objective: no second forward pass. Plain class, no Ray (actors/ wraps it).

At GPU scale: every micro-batch's inputs reach the device before the first forward and metrics
stay on the device until the step is done, so nothing inside a micro-batch waits on the host;
decoder layers recompute their activations in the backward (`activation_checkpointing`); the
sampled tokens' logprobs come from the final hidden states a chunk of rows at a time
(learner/packing.py), never as fp32 logits over the whole vocabulary for a whole micro-batch.
After each step the MoE routers' `expert_bias` moves toward even expert load (aux-loss-free
balancing, `expert_bias_update_rate`), and the max/min load per MoE layer is reported.

Routing replay (`algorithm.routing_replay`, on by default for MoE policies): a trajectory's
`routes` (the experts the rollout engine chose per token and MoE layer) are passed to the
forward, so each token goes through the experts it was sampled with, weighted by this router's
scores (the router still gets a gradient). Tokens without a route (older records, tokens the
engine never processed) are routed by the learner's router.

The mismatch, per token (`last_tokens`, archived with the trajectory): the learner's own logprob,
the loss's `TokenDecision`, and per MoE layer whether the learner's router would pick another
top-k set than the rollout recorded (a route flip; measured with replay on too, against the
router's own choice, which replay overrides). Per step: `route_flip_rate` over (token, MoE layer)
pairs with a recorded route, split by the attention of the layer's block (`_lightning`, `_mla`).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from inspect import signature
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from kpop.algo.advantages import group_index, grpo_advantages, length_rewards, rloo_advantages, varied_groups
from kpop.algo.losses import LossSpec, TokenDecision, linguistic_units, policy_loss, summarize, token_decisions
from learner.packing import Packed, chunked_token_logprobs, flat, flat_rows, pack, plan_micro_batches, token_logprobs

log = logging.getLogger(__name__)

TokenTexts = Callable[[Sequence[int]], list[str]]  # token ids -> each token's detokenized text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_group(ds, backend: str) -> None:
    """A process group of this one process (rank 0 of 1) on `backend`, at a port of its own."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    own_port = "MASTER_PORT" not in os.environ
    if own_port:
        os.environ["MASTER_PORT"] = str(_free_port())
    try:
        ds.init_distributed(dist_backend=backend)
    finally:
        if own_port:
            # the group holds the port now; processes started later from this one (Ray workers)
            # would inherit it and fail to bind it for their own learner
            del os.environ["MASTER_PORT"]


def _serves(backend: str, on_gpu: bool) -> bool:
    """Whether a process group on `backend` ("nccl", "gloo", "cpu:gloo,cuda:nccl", ...) carries
    this device's collectives: NCCL for CUDA tensors, a CPU-capable backend for CPU ones."""
    return "nccl" in backend if on_gpu else any(b in backend for b in ("gloo", "mpi", "ccl"))


def import_deepspeed(on_gpu: bool):
    """Import DeepSpeed for this device and join (or create) the process group.

    DeepSpeed keeps one accelerator per process, chosen at its first import (DS_ACCELERATOR, else
    auto-detected), and every engine it builds afterwards lives on that accelerator's device. A
    process may build a CPU learner and later a GPU one (or the reverse): the accelerator is
    switched to this learner's device here, and the single-process group is re-created on a backend
    that carries the device's collectives (NCCL for CUDA, gloo for CPU). A learner built before a
    switch belongs to the old group and must not step again. A multi-process group (torchrun) cannot
    be re-created by one rank: a mismatch there is an error naming both sides.

    Its extension builds go to TORCH_EXTENSIONS_DIR (cached under ~/.cache/kpop). A single CPU
    process has no peer to share memory with, so the shm collective (a 60-130 s JIT build on first
    use) is switched off and gloo is used directly. Launched by torchrun, RANK/WORLD_SIZE/MASTER_*
    are already set."""
    want = "cuda" if on_gpu else "cpu"
    # before the first import only: it picks the accelerator then (and skips auto-detection's warning)
    os.environ.setdefault("DS_ACCELERATOR", want)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/kpop/torch_extensions"))
    import deepspeed
    from deepspeed.accelerator import get_accelerator, set_accelerator

    backend = "nccl" if on_gpu else "gloo"
    dist = torch.distributed
    have_backend = str(dist.get_backend()) if dist.is_initialized() else None
    if have_backend is not None and not _serves(have_backend, on_gpu) and dist.get_world_size() != 1:
        # checked before anything changes: the process stays as it was
        raise RuntimeError(
            f"a {want} learner needs a {backend} process group, but this process already belongs to a "
            f"{have_backend} group of {dist.get_world_size()} processes (an earlier learner on the other "
            "device?); one rank cannot re-create it: build every learner of a multi-process run on one "
            "kind of device")
    have = get_accelerator().device_name()
    if have != want:
        if on_gpu:
            from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator as Accelerator
        else:
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as Accelerator
        log.info("DeepSpeed's accelerator was %s (DS_ACCELERATOR=%s); switching it to %s for this learner",
                 have, os.environ.get("DS_ACCELERATOR"), want)
        set_accelerator(Accelerator())

    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    if single and not on_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if have_backend is not None and not _serves(have_backend, on_gpu):  # a single process: re-create it
        log.info("re-creating the single-process group on %s (it was %s) for a %s learner", backend, have_backend,
                 want)
        if deepspeed.comm.is_initialized():
            deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached subgroups
        else:
            dist.destroy_process_group()
    if not dist.is_initialized():
        if single:
            _single_process_group(deepspeed, backend)
        else:
            deepspeed.init_distributed(dist_backend=backend)
    return deepspeed


def lr_factor(step: int, warmup_steps: int, schedule: str, total_steps: int | None) -> float:
    """Linear warmup over `warmup_steps`, then constant or cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        if not total_steps:
            raise ValueError("learner.lr_schedule 'cosine' needs total_steps (schedule.rl_steps) > 0")
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learner.lr_schedule {schedule!r}: expected constant or cosine")


def _rollout_logprobs(traj, n: int, mask: list[bool]) -> list[float]:
    """Per-token rollout logprobs aligned to token_ids, whether stored for every token or only
    for the loss tokens."""
    lps = list(traj.logprobs)
    if len(lps) == n:
        return lps
    if len(lps) == sum(mask):
        it = iter(lps)
        return [next(it) if m else 0.0 for m in mask]
    raise ValueError(
        f"trajectory {getattr(traj, 'trajectory_id', '?')}: {len(lps)} logprobs for {n} tokens "
        f"({sum(mask)} loss tokens); expected one per token or one per loss token"
    )


def _sequences(items: Sequence, what: str) -> tuple[list[list[int]], list[list[bool]]]:
    """token ids and loss masks of trajectories or (token_ids, loss_mask) pairs, checked."""
    pairs = [(e.token_ids, e.loss_mask) if hasattr(e, "token_ids") else e for e in items]
    ids = [list(i) for i, _ in pairs]
    masks = [[bool(m) for m in mask] for _, mask in pairs]
    for t, (i, m) in enumerate(zip(ids, masks)):
        if len(i) != len(m):
            raise ValueError(f"{what} {t}: {len(i)} token_ids but {len(m)} loss_mask entries")
        if m and m[0]:
            raise ValueError(f"{what} {t}: its first token is a loss token, but nothing predicts it")
    return ids, masks


def checkpoint_layers(model: torch.nn.Module) -> int:
    """Recompute each decoder layer (the modules HF names in `_no_split_modules`) in the backward
    instead of keeping its activations; returns how many layers were wrapped. MoE gates inside a
    layer stop counting expert load while it is recomputed (the recompute routes the same tokens
    again). Names, parameters and state dicts are untouched: only the instances' forward changes."""
    kinds = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in kinds]
    for layer in layers:
        gates = [m for m in layer.modules() if hasattr(m, "count_load")]
        layer.forward = _checkpointed(layer.forward, gates)
    return len(layers)


def _checkpointed(forward: Callable, gates: list[torch.nn.Module]) -> Callable:
    @contextmanager
    def recomputing():
        for g in gates:
            g.count_load = False
        try:
            yield
        finally:
            for g in gates:
                g.count_load = True

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), recomputing()), **kwargs)

    return run


def expert_gates(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every MoE router that keeps `expert_bias` and counts `expert_load`."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "expert_bias") and hasattr(m, "expert_load")]


@torch.no_grad()
def balance_experts(gates: list[tuple[str, torch.nn.Module]], rate: float) -> dict[str, float]:
    """Aux-loss-free balancing (DeepSeek-V3, Ring-2.6): each router's `expert_bias` moves by `rate`
    up for experts loaded under the layer's mean and down for those over it; the gradient never
    touches it. Resets the counts. Returns the max and min load over the mean per MoE layer that
    saw tokens (1.0 = even), one host read for all layers."""
    if not gates:
        return {}
    loads = torch.stack([g.expert_load for _, g in gates]).float()  # [layers, experts]
    mean = loads.mean(-1, keepdim=True)
    if rate > 0:
        step = rate * torch.sign(mean - loads)  # 0 where the layer saw no token
        for (_, g), d in zip(gates, step):
            g.expert_bias.add_(d.to(g.expert_bias.dtype))
    rel = loads / mean.clamp(min=1e-9)
    hi, lo, seen = rel.max(-1).values.tolist(), rel.min(-1).values.tolist(), (mean[:, 0] > 0).tolist()
    for _, g in gates:
        g.expert_load.zero_()
    out = {}
    for (name, _), a, b, s in zip(gates, hi, lo, seen):
        if s:  # a layer the step never ran (an MTP layer in RL) has no load to report
            layer = name.removeprefix("model.").removesuffix(".gate").removesuffix(".mlp")
            out[f"moe_load_max/{layer}"], out[f"moe_load_min/{layer}"] = a, b
    return out


def route_ids(routes, n: int, moe_layers: int, top_k: int, num_experts: int, what: str) -> torch.Tensor:
    """A trajectory's recorded routes as the model's `expert_ids` ([n, layers, top_k] int64, -1 rows
    where a token has none), checked against the policy: a record is untrusted input."""
    if routes is None:
        return torch.full((n, moe_layers, top_k), -1, dtype=torch.long)
    if tuple(routes.shape) != (n, moe_layers, top_k):
        raise ValueError(f"{what}: routes of shape {list(routes.shape)} do not fit this policy "
                         f"([tokens={n}, MoE layers={moe_layers}, top_k={top_k}])")
    ids = routes.ids()
    if ids.numel() and int(ids.max()) >= num_experts:
        raise ValueError(f"{what}: routes name expert {int(ids.max())}, the policy has {num_experts}")
    return ids


@dataclass
class TokenRecord:
    """What the learner's last step saw per token of one trajectory, aligned with its token_ids."""

    train_logprobs: list[float] | None  # None: not forwarded (failed, filtered out)
    decisions: list[int]  # TokenDecision values
    route_flips: list[int] | None  # per token, bit l: MoE layer l's route flipped; None: no recorded routes

    @classmethod
    def untrained(cls, n: int) -> "TokenRecord":
        return cls(None, [int(TokenDecision.NOT_TRAINED)] * n, None)


def route_flips(own: torch.Tensor, recorded: torch.Tensor) -> torch.Tensor:
    """bool [T, layers]: the router's own top-k set (`own` [T, layers, k]) differs from the recorded
    one (-1 rows: no recorded route, never a flip). Sets, not orders: the engine's batched kernels
    may order a token's top-k differently."""
    differ = (own.sort(-1).values != recorded.sort(-1).values).any(-1)
    return differ & (recorded[..., 0] >= 0)


def pack_flips(flips: torch.Tensor) -> list[int]:
    """bool [T, layers] -> one int per token, bit l = layer l (Python ints: more than 64 layers fit)."""
    import numpy as np

    rows = np.packbits(flips.cpu().numpy(), axis=1, bitorder="little")
    return [int.from_bytes(r.tobytes(), "little") for r in rows]


def _min_version(traj) -> int | None:
    return min((s[2] for s in traj.segments), default=None)  # Segment = (start, end, version)


class Learner:
    def __init__(
        self,
        learner_cfg,
        algorithm_cfg,
        model: torch.nn.Module,
        *,
        total_steps: int | None = None,
        token_texts: TokenTexts | None = None,
    ) -> None:
        """`learner_cfg` / `algorithm_cfg`: the `learner` and `algorithm` sections of the run config.
        `total_steps`: RL steps of the run (for the cosine schedule). `token_texts`: needed by LPO
        to split responses into sentences (e.g. `lambda ids: [tok.decode([i]) for i in ids]`)."""
        self.cfg, self.algo = learner_cfg, algorithm_cfg
        self.spec = LossSpec.from_config(algorithm_cfg)
        if self.spec.loss == "lpo" and token_texts is None:
            raise ValueError("algorithm.loss 'lpo' needs token_texts (token ids -> texts) to find sentence boundaries")
        self.token_texts = token_texts
        self.total_steps = total_steps
        lr_factor(0, learner_cfg.warmup_steps, learner_cfg.lr_schedule, total_steps)  # fail early on a bad schedule
        on_gpu = learner_cfg.num_gpus > 0
        if on_gpu and not torch.cuda.is_available():
            raise ValueError(f"learner.num_gpus={learner_cfg.num_gpus} but CUDA is not available")
        if learner_cfg.dtype == "bfloat16" and not on_gpu:
            raise ValueError("learner.dtype 'bfloat16' is for GPUs; on CPU (learner.num_gpus=0) use float32")
        ds = import_deepspeed(on_gpu)
        ckpt = learner_cfg.activation_checkpointing
        self.checkpointed_layers = checkpoint_layers(model) if (on_gpu if ckpt is None else ckpt) else 0
        self._gates = expert_gates(model)
        # route flips: each MoE gate hands its router's own choice to `_own_routes` while a step
        # collects them; hooked before DeepSpeed's own hooks, so under ZeRO-3 the weight is still gathered
        self._own_routes: list[torch.Tensor] | None = None
        for i in model.moe_layers() if hasattr(model, "moe_layers") else []:
            model.model.layers[i].mlp.gate.register_forward_hook(self._router_choice)
        ds_config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            # one step() per train_step whatever the number of micro-batches
            "managed_gradient_accumulation": False,
            "gradient_clipping": learner_cfg.max_grad_norm,
            "zero_optimization": {"stage": learner_cfg.zero_stage},
            "bf16": {"enabled": learner_cfg.dtype == "bfloat16"},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        # a torch optimizer: DeepSpeed's fused/CPU Adam would JIT-compile a C++ op (~210 s on CPU)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=learner_cfg.lr, betas=tuple(learner_cfg.betas), weight_decay=learner_cfg.weight_decay
        )
        self.engine, self.optimizer, _, _ = ds.initialize(model=model, optimizer=optimizer, config=ds_config)
        self._ds = ds
        params = signature(model.forward).parameters
        # MTP heads only matter for the SFT/pretraining loss, not for RL logprobs
        self._fwd_kwargs = {"return_mtp": False} if "return_mtp" in params else {}
        # logprobs from hidden states a chunk at a time; ZeRO-3 gathers the LM head only inside the
        # model's forward, so there the model computes the logits itself
        if "return_logits" in params and hasattr(model, "logits") and learner_cfg.zero_stage != 3:
            self._fwd_kwargs["return_logits"] = False
        # routing replay: the policy's MoE layers take the rollout's experts (None = on for MoE)
        moe = model.moe_layers() if hasattr(model, "moe_layers") and "expert_ids" in params else []
        replay = getattr(algorithm_cfg, "routing_replay", None)
        if replay and not moe:
            raise ValueError("algorithm.routing_replay is on but the policy has no MoE layer to replay")
        self.routing_replay = bool(moe) and replay is not False
        self._route_shape = (len(moe), model.config.num_experts_per_tok, model.config.num_experts) if moe else None
        kinds = model.config.mixer_types() if moe else []
        self._moe_mla = torch.tensor([kinds[i] == "attention" for i in moe], dtype=torch.bool)
        self.last_tokens: list[TokenRecord] = []  # per trajectory of the last train_step
        self.version = 0  # optimiser steps taken (RL + SFT): the exported weights' version
        self.rl_steps = 0  # drives the lr schedule
        self.sft_steps = 0

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def _router_choice(self, gate: torch.nn.Module, args: tuple, out: tuple) -> None:
        """Forward hook of each MoE gate: the experts its router picks for these rows, even when
        replay forced others. Skipped outside a collecting step and in the backward's recompute of a
        checkpointed layer (the gate's `count_load` is off there; the rows are the same)."""
        if self._own_routes is None or not gate.count_load:
            return
        forced = args[1] if len(args) > 1 else None
        if forced is None:
            own = out[0]
        else:
            with torch.no_grad():
                own = gate.select(torch.sigmoid(torch.nn.functional.linear(args[0].float(), gate.weight.float())))
        self._own_routes.append(own.detach())

    # -- forward -----------------------------------------------------------------------------

    def _logprobs(self, ids: torch.Tensor, cu_seqlens: torch.Tensor, entropy: bool = False,
                  expert_ids: torch.Tensor | None = None):
        """(logprobs [T], entropy [T] or None) of one packed micro-batch already on the device;
        `expert_ids` [T, MoE layers, top_k] replays the rollout's routing (-1 rows: the router's)."""
        kwargs = dict(self._fwd_kwargs)
        if expert_ids is not None:
            kwargs["expert_ids"] = expert_ids
        out = self.engine(ids, cu_seqlens=cu_seqlens, **kwargs)
        if out.logits is None:
            return chunked_token_logprobs(out.hidden_states, self.engine.module.logits, ids, with_entropy=entropy)
        lp = token_logprobs(out.logits, ids)
        if not entropy:
            return lp, None
        with torch.no_grad():
            logits = out.logits[0, :-1].float()
            ent = torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
        return lp, torch.nn.functional.pad(ent, (1, 0))

    def _stage(self, packed: Packed, per_token: dict[str, tuple[Sequence, torch.dtype]],
               routes: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """One micro-batch's tensors on the device (copied before the first forward, so no copy
        inside a micro-batch waits for the GPU)."""
        dev, nb = self.device, self.device.type == "cuda"
        out = {"ids": packed.input_ids.to(dev, non_blocking=nb), "cu": packed.cu_seqlens.to(dev, non_blocking=nb)}
        for name, (values, dtype) in per_token.items():
            out[name] = flat(values, packed.index, dtype).to(dev, non_blocking=nb)
        if routes is not None:
            out["routes"] = flat_rows(routes, packed.index).to(dev, non_blocking=nb)
        return out

    def _recorded(self, routes: Sequence, lengths: list[int], names: Sequence[str]) -> list[torch.Tensor] | None:
        """Per sequence, its recorded routes (`Routes` or None) as `expert_ids` (-1 rows: none), or
        None for a dense policy or no routes at all. With replay on a route that does not fit the
        policy is an error; with it off the routes only measure flips, so such a sequence counts as
        having none."""
        if self._route_shape is None or all(r is None for r in routes):
            return None
        layers, k, experts = self._route_shape
        out = []
        for r, n, name in zip(routes, lengths, names):
            try:
                out.append(route_ids(r, n, layers, k, experts, name))
            except ValueError:
                if self.routing_replay:
                    raise
                out.append(route_ids(None, n, layers, k, experts, name))
        return out

    def _replayed(self, routes: Sequence, lengths: list[int], names: Sequence[str]) -> list[torch.Tensor] | None:
        """`_recorded`, or None with replay off."""
        return self._recorded(routes, lengths, names) if self.routing_replay else None

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _step(self, lr: float) -> float:
        """Clip, update, bump the version; returns the pre-clip gradient norm."""
        norm = None
        if self.cfg.zero_stage == 0:  # DeepSpeed reports the norm only from its ZeRO optimizers
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        self._set_lr(lr)
        self.engine.step()
        self.version += 1
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # -- RL ----------------------------------------------------------------------------------

    def _advantages(self, trajectories: Sequence, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        groups = group_index([t.group_id for t in trajectories])
        rewards = torch.tensor([float(t.reward) for t in trajectories])
        if self.algo.length_reward:
            # Evo-CoT: a positive task reward counts as correct
            rewards = rewards + length_rewards(torch.tensor(lengths), rewards > 0, groups)
        keep = torch.ones(len(rewards), dtype=torch.bool)
        if self.algo.dynamic_filter:
            keep = varied_groups(rewards, groups)
        if self.algo.advantage == "grpo":
            adv = grpo_advantages(rewards, groups, normalize_std=self.algo.normalize_std)
        elif self.algo.advantage == "rloo":
            adv = rloo_advantages(rewards, groups)
        else:
            raise ValueError(f"unknown algorithm.advantage {self.algo.advantage!r}: expected grpo or rloo")
        stats = {"reward_mean": float(rewards.mean()), "filtered": float((~keep).sum())}
        return adv, keep, stats

    def train_step(self, trajectories: Sequence) -> dict[str, float]:
        """One optimiser step on a batch of finished trajectories (`token_ids`, `logprobs`,
        `loss_mask`, `reward`, `group_id`, `segments`). Returns metrics; `skipped` = 1 when
        dynamic filtering left nothing to learn from (no step, version unchanged)."""
        t0 = time.perf_counter()
        if not trajectories:
            raise ValueError("train_step needs at least one trajectory")
        n_in = len(trajectories)
        self.last_tokens = [TokenRecord.untrained(len(t.token_ids)) for t in trajectories]
        # an infrastructure failure says nothing about the policy: learn nothing from it
        kept = [j for j, t in enumerate(trajectories) if getattr(t, "status", "ok") != "failed"]
        trajectories = [trajectories[j] for j in kept]
        if not trajectories:
            return {"trajectories": float(n_in), "failed": float(n_in), "used": 0.0, "skipped": 1.0,
                    "version": float(self.version), "step_s": time.perf_counter() - t0}
        ids, masks = _sequences(trajectories, "trajectory")
        behav = [_rollout_logprobs(t, len(i), m) for t, i, m in zip(trajectories, ids, masks)]
        adv, keep, metrics = self._advantages(trajectories, [sum(m) for m in masks])
        use = [k for k in range(len(ids)) if keep[k] and any(masks[k])]
        versions = [v for v in map(_min_version, trajectories) if v is not None]
        metrics["staleness_mean"] = (
            sum(self.version - v for v in versions) / len(versions) if versions else 0.0
        )
        metrics.update(
            trajectories=float(n_in), failed=float(n_in - len(trajectories)), used=float(len(use)),
            version=float(self.version),
        )
        if not use:
            return {**metrics, "skipped": 1.0, "step_s": time.perf_counter() - t0}

        units = self._units(use, ids, masks)
        norm = float(len(use)) if self.spec.loss == "gspo" else float(sum(sum(masks[k]) for k in use))
        lengths = [len(ids[k]) for k in use]
        plan = self._plan(use, ids)
        adv_tok = [[float(adv[k])] * len(ids[k]) for k in range(len(ids))]
        lr = self.cfg.lr * lr_factor(self.rl_steps, self.cfg.warmup_steps, self.cfg.lr_schedule, self.total_steps)
        self.engine.train()
        per_token = {"behav": (behav, torch.float32), "adv": (adv_tok, torch.float32), "mask": (masks, torch.bool),
                     "units": (units, torch.long)}
        routes = self._recorded([getattr(t, "routes", None) for t in trajectories], [len(i) for i in ids],
                                [f"trajectory {getattr(t, 'trajectory_id', k)}" for k, t in enumerate(trajectories)])
        if self.routing_replay:  # share of the trained tokens whose experts were replayed
            routed = sum(int((routes[k][:, 0, 0] >= 0).sum()) for k in use) if routes is not None else 0
            metrics["routing_replay_share"] = routed / max(sum(len(ids[k]) for k in use), 1)
        packs = [pack(ids, index) for index in plan]
        staged = [self._stage(p, per_token, routes) for p in packs]
        loss_total = torch.zeros((), device=self.device)
        entropy_sum = torch.zeros((), device=self.device)
        stats, seen = [], []  # seen: per micro-batch (logp, decisions, flips or None), kept on the device
        for mb in staged:
            self._own_routes = own = [] if "routes" in mb else None
            try:
                logp, entropy = self._logprobs(mb["ids"], mb["cu"], entropy=True,
                                               expert_ids=mb.get("routes") if self.routing_replay else None)
            finally:
                self._own_routes = None
            prox = logp.detach()  # proximal policy: this step's weights, before it updates them
            decisions = token_decisions(prox, mb["behav"], mb["mask"], self.spec)
            loss, s = policy_loss(logp, prox, mb["behav"], mb["adv"], mb["mask"], mb["units"], self.spec,
                                  norm=norm, decisions=decisions)
            self.engine.backward(loss, scale_wrt_gas=False)
            loss_total += loss.detach()
            entropy_sum += (entropy * mb["mask"]).sum()
            stats.append(s)
            seen.append((prox, decisions, route_flips(torch.stack(own, 1), mb["routes"]) if own else None))
        grad_norm = self._step(lr)
        self.rl_steps += 1
        metrics.update(self._record_tokens(packs, seen, kept, routes))
        metrics.update(balance_experts(self._gates, self.cfg.expert_bias_update_rate))
        loss_tokens = sum(sum(masks[k]) for k in use)
        dt = time.perf_counter() - t0
        tokens = sum(lengths)
        return {
            **metrics,
            **summarize(stats),
            "loss": float(loss_total),
            "entropy": float(entropy_sum) / max(loss_tokens, 1),
            "grad_norm": grad_norm,
            "lr": lr,
            "version": float(self.version),
            "micro_batches": float(len(plan)),
            "tokens": float(tokens),
            "tokens_per_s": tokens / dt,
            "step_s": dt,
            "skipped": 0.0,
        }

    def _record_tokens(self, packs: list[Packed], seen: list[tuple], kept: list[int],
                       routes: list[torch.Tensor] | None) -> dict[str, float]:
        """Fill `last_tokens` for the trained sequences (sequence k is input trajectory kept[k]) from
        the step's device tensors (one host copy per micro-batch, after the optimiser step) and
        return the route-flip rates."""
        flipped = torch.zeros(2, dtype=torch.long)  # Lightning, MLA
        pairs = torch.zeros(2, dtype=torch.long)
        mla = self._moe_mla
        for packed, (logp, decisions, flips) in zip(packs, seen):
            cu = packed.cu_seqlens.tolist()
            logp, decisions = logp.float().cpu(), decisions.cpu()
            if flips is not None:
                flips = flips.cpu()
                known = torch.cat([routes[k][:, 0, 0] >= 0 for k in packed.index])  # tokens with a recorded route
                flipped += torch.stack([flips[:, ~mla].sum(), flips[:, mla].sum()])
                pairs += known.sum() * torch.stack([(~mla).sum(), mla.sum()])
            for j, k in enumerate(packed.index):
                a, b = cu[j], cu[j + 1]
                lp = logp[a:b].tolist()
                lp[0] = 0.0  # nothing predicts a sequence's first token (its slot holds the previous sequence's)
                recorded = flips is not None and bool((routes[k][:, 0, 0] >= 0).any())
                self.last_tokens[kept[k]] = TokenRecord(
                    lp, decisions[a:b].tolist(), pack_flips(flips[a:b]) if recorded else None)
        if not int(pairs.sum()):
            return {}
        out = {"route_flip_rate": int(flipped.sum()) / int(pairs.sum())}
        for kind, f, n in zip(("lightning", "mla"), flipped.tolist(), pairs.tolist()):
            if n:  # a policy without MoE layers after this kind of attention has no such rate
                out[f"route_flip_rate_{kind}"] = f / n
        return out

    def last_token_columns(self) -> dict[str, list]:
        """`last_tokens` as the per-token keyword arguments of `TrajectoryArchive.write`."""
        return {"train_logprobs": [r.train_logprobs for r in self.last_tokens],
                "decisions": [r.decisions for r in self.last_tokens],
                "route_flips": [r.route_flips for r in self.last_tokens]}

    def _plan(self, use: list[int], ids: list[list[int]]) -> list[list[int]]:
        """Micro-batches (lists of indices into ids) of the sequences in `use`."""
        bins = plan_micro_batches([len(ids[k]) for k in use], self.cfg.micro_batch_tokens)
        return [[use[j] for j in b] for b in bins]

    def _units(self, use: list[int], ids: list[list[int]], masks: list[list[bool]]) -> list[list[int]]:
        """Ratio units per token, unique across the batch: a sequence (GSPO) or a sentence (LPO)."""
        units: list[list[int]] = [[] for _ in ids]
        offset = 0
        for k in use:
            if self.spec.loss == "lpo":
                local = linguistic_units(self.token_texts(ids[k]), masks[k])
            else:
                local = [0] * len(ids[k])
            units[k] = [offset + u for u in local]
            offset += local[-1] + 1
        return units

    # -- SFT ---------------------------------------------------------------------------------

    def sft_step(self, examples: Sequence) -> dict[str, float]:
        """One cold-start SFT step: mean next-token cross-entropy over the loss-masked tokens of
        `examples` (trajectories, or (token_ids, loss_mask) pairs), at learner.sft_lr."""
        t0 = time.perf_counter()
        ids, masks = _sequences(examples, "example")
        use = [k for k in range(len(ids)) if any(masks[k])]
        if not use:
            raise ValueError("sft_step: no example has a loss token")
        norm = float(sum(sum(masks[k]) for k in use))
        plan = self._plan(use, ids)
        self.engine.train()
        staged = [self._stage(pack(ids, index), {"mask": (masks, torch.bool)}) for index in plan]
        loss_total = torch.zeros((), device=self.device)
        for mb in staged:
            logp, _ = self._logprobs(mb["ids"], mb["cu"])
            loss = -(logp * mb["mask"]).sum() / norm
            self.engine.backward(loss, scale_wrt_gas=False)
            loss_total += loss.detach()
        grad_norm = self._step(self.cfg.sft_lr)
        self.sft_steps += 1
        balance = balance_experts(self._gates, self.cfg.expert_bias_update_rate)
        return {"sft_loss": float(loss_total), "grad_norm": grad_norm, "version": float(self.version),
                "step_s": time.perf_counter() - t0, **balance}

    # -- weights and checkpoints ---------------------------------------------------------------

    @torch.no_grad()
    def logprobs(self, token_ids: Sequence[Sequence[int]], routes: Sequence | None = None) -> list[torch.Tensor]:
        """Per-sequence log p(x_t | x_<t) for t >= 1 under the current weights (eval helper);
        `routes` (a `Routes` or None per sequence) are replayed when routing replay is on."""
        self.engine.eval()
        out = []
        replay = None
        if routes is not None:
            replay = self._replayed(routes, [len(s) for s in token_ids], [f"sequence {k}" for k in range(len(routes))])
        for index in plan_micro_batches([len(s) for s in token_ids], self.cfg.micro_batch_tokens):
            packed = pack(token_ids, index)
            mb = self._stage(packed, {}, replay)
            lp = self._logprobs(mb["ids"], mb["cu"], expert_ids=mb.get("routes"))[0].cpu()
            cu = packed.cu_seqlens.tolist()
            out.extend((i, lp[cu[j] + 1 : cu[j + 1]]) for j, i in enumerate(index))
        self.engine.train()
        return [lp for _, lp in sorted(out, key=lambda x: x[0])]

    @contextmanager
    def weights(self) -> Iterator[dict[str, torch.Tensor]]:
        """The model's state dict as it is on the learner's device (gathered under ZeRO-3), no copy:
        valid inside the block only (the next step changes it; ZeRO-3 frees the gathered tensors).
        A weight sync copies it once into its own buckets there."""
        module = self.engine.module
        gather = (self._ds.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
                  if self.cfg.zero_stage == 3 else nullcontext())
        with gather, torch.no_grad():
            yield {k: v.detach() for k, v in module.state_dict().items()}

    def export_weights(self) -> tuple[dict[str, torch.Tensor], int]:
        """A full CPU copy of the model's state dict and its version (checkpoints, tests)."""
        with self.weights() as state:
            return {k: v.to("cpu", copy=True) for k, v in state.items()}, self.version

    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        """Checkpoint model, optimizer, lr-schedule position, version and the caller's opaque
        `extra` into `directory/v<version>`; keeps the newest learner.keep_checkpoints."""
        directory = Path(directory)
        tag = f"v{self.version:08d}"
        state = {"kpop": {"version": self.version, "rl_steps": self.rl_steps, "sft_steps": self.sft_steps,
                          "extra": dict(extra or {})}}
        self.engine.save_checkpoint(str(directory), tag=tag, client_state=state)
        tags = sorted(p.name for p in directory.glob("v*") if p.is_dir())
        for old in tags[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(directory / old, ignore_errors=True)
        return directory / tag

    def load(self, directory: str | Path) -> dict:
        """Restore the newest checkpoint in `directory`; returns the `extra` it was saved with."""
        directory = Path(directory)
        if not (directory / "latest").is_file():
            raise FileNotFoundError(f"{directory}: no learner checkpoint (no 'latest' file)")
        path, client = self.engine.load_checkpoint(str(directory), load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if path is None or "kpop" not in (client or {}):
            raise ValueError(f"{directory}: checkpoint could not be loaded or was not written by a KPop learner")
        state = client["kpop"]
        self.version, self.rl_steps, self.sft_steps = state["version"], state["rl_steps"], state["sft_steps"]
        log.info("learner resumed from %s at version %d", path, self.version)
        return state["extra"]
