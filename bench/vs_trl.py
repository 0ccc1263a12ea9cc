"""KPop vs TRL's `GRPOTrainer`: the same policy, task, starting point, eval and wall-clock budget.

    PYTHONPATH=. python bench/vs_trl.py --json [--minutes 4] [--record] [--install-trl]

Policy: the quickstart's Ring-2.6 policy (`small` preset, 1.6M parameters, fp32), loaded on the TRL
side through its HF `AutoModelForCausalLM` registration, with KPop's local tokenizer and chat template.
Task: `kpop-bench/single-call-v0`, registered by this bench only: tool-use difficulty 0 cut to ONE
turn ("add 17 and 25" -> the reply must be the calculator call; reward 0.2 if a call parses and runs
+ 0.8 if it returns the right number). GRPOTrainer's contract is prompt -> one completion -> reward,
so TRL's reward function is this environment's own verifier (`verifier_rewards`: reset with the
prompt's seed, step with the parsed completion), not a re-implementation.
Start: one short cold-start SFT by `kpop train` (oracle demonstrations, `--sft-steps`), saved as an
HF checkpoint; both sides start from it. Not from scratch: an untrained policy never emits a
parsable call, every group's rewards agree and neither side gets a gradient in minutes. A short
SFT leaves the policy partly right, which is where RL has something to improve.
Budget: each side trains for `--minutes` of wall clock, start-up included (Ray + learner for KPop;
model load + trainer set-up for TRL), one after the other. The policy kept is the newest one
finished within the budget: KPop checkpoints every step and gets SIGTERM at the deadline; TRL's
callback does not start a step that would end past it.
Eval: the same function for both (`kpop.evaluate.evaluate`, embedded engine, held-out seeds
10000.. of the eval split): greedy, and `--eval-samples` samples per seed at temperature 1.

TRL is not a KPop dependency. It is imported from its own target dir (default
~/.cache/kpop/bench-trl), never from the project's venv, with these pins (torch and transformers are
the venv's):
    trl==1.16.0 accelerate==1.16.0 datasets==5.2.0 pandas==3.1.1 xxhash==4.1.0
    multiprocess==0.70.19 python-dateutil==2.9.0.post0
`--install-trl` runs `pip install --no-deps --target DIR <pins>`.

TRL 1.16 cannot train this model as registered. The bench runs a 1-step probe of the plain model
and reports each error (`trl_as_registered`); the causes:
  1. GRPOConfig turns gradient checkpointing on by default; the class does not support it
     (ValueError). Config: gradient_checkpointing=False.
  2. bf16=True by default: CPU autocast runs the v projection in bf16 while q/k leave their fp32
     RMSNorms, and lightning_attn refuses mixed dtypes (ValueError). Config: bf16=False (fp32, as
     the quickstart trains).
  3. TRL's fused LM head calls `model.base_model(input_ids=..., attention_mask=...)` for
     `last_hidden_state` (the HF backbone convention); this model's backbone has no forward (the
     CausalLM's forward runs the layers), so: TypeError ... unexpected keyword argument 'input_ids'.
     TRL 1.16 has no switch to turn the fused head off.
  4. Behind that: the forward refuses padding masks, and TRL pads every batch; and `generate`
     drops the attention mask (`prepare_inputs_for_generation` keeps only input_ids), so
     left-padded prompts would silently feed pad tokens into the Lightning state.
The bench then trains TRL through `TRLAdapter`, a subclass that only changes how a padded batch
reaches the model (3 and 4; see its docstring). HF `generate` cannot use the model's HybridCache,
so TRL's sampling re-runs the whole prefix for every new token: part of its cost per step here.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/ itself, whose kernels.py would shadow the kernels package

from environments.core import Message  # noqa: E402
from environments.tooluse.env import ToolUseEnv  # noqa: E402

log = logging.getLogger("bench.vs_trl")

ENV_ID = "kpop-bench/single-call-v0"
ENTRY_POINT = "bench.vs_trl:SingleCallEnv"
TRL_PINS = ("trl==1.16.0", "accelerate==1.16.0", "datasets==5.2.0", "pandas==3.1.1", "xxhash==4.1.0",
            "multiprocess==0.70.19", "python-dateutil==2.9.0.post0")
TRL_DIR = Path(os.environ.get("KPOP_CACHE", Path.home() / ".cache" / "kpop")) / "bench-trl"
EVAL_SEED0 = 10_000


# -- the task ------------------------------------------------------------------------------------

class SingleCallEnv(ToolUseEnv):
    """Tool-use difficulty 0 in one turn: the reply must be the calculator call that answers the
    prompt. Reward: 0.2 if some call parsed and ran, + 0.8 if one returned the right number. A
    reply without a call ends the episode with reward 0."""

    def __init__(self, split: str = "all", render_mode: str | None = None) -> None:
        super().__init__(difficulty=0, split=split, show_tools=False, max_turns=1, render_mode=render_mode)

    def _after_tools(self, new: list[Message]):
        # the call's result is the outcome: the episode ends here (terminated, not cut off), which
        # is also what lets SFT take oracle episodes as demonstrations
        self.transcript += copy.deepcopy(new)
        self._done = True
        reward, detail = self._verify(None)
        return new, float(reward), True, False, self._info(reward_detail=detail)

    def _verify(self, final: Message | None) -> tuple[float, dict[str, Any]]:
        _, detail = super()._verify(final)
        return 0.2 * detail["call"] + 0.8 * detail["tool"], detail


def register_env(plugin_root: Path) -> Path:
    """Register the task here and for every process started later with this environment.

    In this process through `environments.registry.register`; Ray workers of `kpop train` (which
    inherit PYTHONPATH) find it the way any third-party env is found, by an entry point in the
    `kpop.environments` group: a dist-info directory on the path, written here."""
    from environments.registry import ENTRY_POINT_GROUP, register

    info = plugin_root / "kpop_bench_vs_trl-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kpop-bench-vs-trl\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{ENV_ID} = {ENTRY_POINT}\n")
    paths = [str(plugin_root), str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    sys.path.insert(0, str(plugin_root))
    register(ENV_ID, ENTRY_POINT)
    return plugin_root


def completion_message(tokenizer: Any, completion_ids: Sequence[int]) -> Message:
    """A sampled turn as the assistant message the env sees, parsed as KPop's chat client does:
    decoded with special tokens kept (a tool call is `<tool_call>...</tool_call>`, both special),
    cut at the end-of-turn token."""
    from kpop.policy.chat import parse_assistant

    text = tokenizer.decode(list(completion_ids), skip_special_tokens=False)
    end = text.find(tokenizer.eos_token)
    return parse_assistant(text if end < 0 else text[:end]).to_message()


def verifier_rewards(tokenizer: Any, completion_ids: Sequence[Sequence[int]], seeds: Sequence[int],
                     split: str = "train") -> list[float]:
    """The environment's reward for each completion: reset with the prompt's seed, one step."""
    from environments.registry import make

    env = make(ENV_ID, split=split)
    try:
        out = []
        for ids, seed in zip(completion_ids, seeds, strict=True):
            env.reset(seed=int(seed))
            _, reward, terminated, _, _ = env.step(completion_message(tokenizer, ids))
            if not terminated:
                raise RuntimeError(f"{ENV_ID} did not end after one turn (seed {seed})")
            out.append(float(reward))
        return out
    finally:
        env.close()


def prompt_rows(seeds: Sequence[int], split: str = "train") -> list[dict[str, Any]]:
    """TRL dataset rows: the env's opening messages for each seed, and the seed (for the reward)."""
    from environments.registry import make

    env = make(ENV_ID, split=split)
    try:
        return [{"prompt": env.reset(seed=int(s))[0], "seed": int(s)} for s in seeds]
    finally:
        env.close()


# -- TRL -----------------------------------------------------------------------------------------

def install_command(target: Path = TRL_DIR) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), *TRL_PINS]


def import_trl(target: Path, install: bool) -> Any:
    """Import TRL from `target` (outside the project's venv), installing it there if asked."""
    if install and not (target / "trl").is_dir():
        subprocess.run(install_command(target), check=True)
    if not (target / "trl").is_dir():
        sys.exit(f"TRL is not installed in {target}. Install it there (not into the project's venv):\n  "
                 + " ".join(install_command(target)) + "\nor run this bench with --install-trl.")
    sys.path.insert(0, str(target))
    import warnings

    warnings.filterwarnings("ignore", message="TRL currently supports vLLM")  # TRL is run without vLLM here
    import trl

    return trl


def make_adapter_class() -> type:
    """`TRLAdapter`: the policy class, changed only in how padded batches reach it.

    The model takes no padding mask (a pad token inside a row would enter the Lightning
    recurrent state) and packs variable-length rows with `cu_seqlens` instead; TRL pads prompts on
    the left and completions on the right, and calls `model.base_model(...)` for hidden states
    (the HF backbone convention; this model's backbone has no forward). The adapter packs every
    padded batch into one row by its attention mask, runs the model's own forward, and puts the
    outputs back in place; generation passes the mask through (the plain class drops it, so pad
    tokens would silently enter the state)."""
    import torch
    from types import SimpleNamespace

    from kpop.policy.model import BailingHybridOutput, BailingMoeV2_5ForCausalLM

    class _Backbone:
        def __init__(self, model: "TRLAdapter") -> None:
            self.model = model

        def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any):
            return SimpleNamespace(last_hidden_state=self.model.padded_hidden(input_ids, attention_mask))

    class TRLAdapter(BailingMoeV2_5ForCausalLM):
        @property
        def base_model(self) -> Any:
            return _Backbone(self)

        def padded_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
            if attention_mask is None or bool(attention_mask.all()):
                return super().forward(input_ids, return_mtp=False).hidden_states
            mask = attention_mask.bool()
            lens = mask.sum(1)
            if bool((lens == 0).any()):
                raise ValueError("TRLAdapter: a row has no unmasked token")
            cu = torch.zeros(len(lens) + 1, dtype=torch.int32, device=input_ids.device)
            cu[1:] = lens.cumsum(0)
            packed = super().forward(input_ids[mask][None], cu_seqlens=cu, return_mtp=False).hidden_states[0]
            h = packed.new_zeros(*input_ids.shape, packed.shape[-1])
            h[mask] = packed
            return h

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None, **kwargs: Any) -> BailingHybridOutput:
            if attention_mask is None or bool(attention_mask.all()):
                return super().forward(input_ids, labels=labels, **kwargs)
            if labels is not None:
                raise ValueError("TRLAdapter: labels with a padding mask are not supported")
            h = self.padded_hidden(input_ids, attention_mask)
            return BailingHybridOutput(logits=self.logits(h), hidden_states=h)

        def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs: Any) -> dict:
            return {"input_ids": input_ids, "attention_mask": kwargs.get("attention_mask")}

    return TRLAdapter


def grpo_config(trl: Any, args: argparse.Namespace, out: Path, **changes: Any) -> Any:
    """TRL's GRPO with KPop's quickstart settings where the two have the same knob."""
    kw = dict(output_dir=str(out), use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
              seed=args.seed, max_steps=100_000, per_device_train_batch_size=args.batch,
              num_generations=args.group, max_completion_length=args.max_new_tokens, temperature=1.0,
              learning_rate=args.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=args.warmup,
              max_grad_norm=1.0, epsilon=0.2, epsilon_high=0.28, beta=0.0, scale_rewards="group",
              dataloader_num_workers=0, disable_tqdm=True,
              # TRL's defaults that this model cannot take: see trl_probe
              gradient_checkpointing=False, bf16=False)
    kw.update(changes)
    return trl.GRPOConfig(**kw)


def trl_probe(trl: Any, args: argparse.Namespace, ckpt: Path, base: Path) -> list[dict[str, str]]:
    """One GRPO step of the plain model (loaded with AutoModelForCausalLM) under TRL's defaults,
    then with each failing default turned off: the errors, in order."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from kpop.policy.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt)
    rows = prompt_rows(range(4))
    attempts = [("TRL defaults (gradient_checkpointing and bf16 on)", {"gradient_checkpointing": True, "bf16": True}),
                ("gradient_checkpointing=False", {"bf16": True}),
                ("gradient_checkpointing=False, bf16=False", {})]
    found = []
    for label, changes in attempts:
        model = AutoModelForCausalLM.from_pretrained(str(ckpt))
        cfg = grpo_config(trl, args, base / "trl-probe", **{**changes, "max_steps": 1, "per_device_train_batch_size": 4,
                                                            "num_generations": 2, "max_completion_length": 4})
        trainer = trl.GRPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                                  reward_funcs=lambda completion_ids, seed, **_: verifier_rewards(tok, completion_ids, seed))
        try:
            trainer.train()
        except Exception as exc:  # the point of the probe: record what breaks, then go on
            found.append({"config": label, "error": f"{type(exc).__name__}: {exc}"[:400]})
            continue
        found.append({"config": label, "error": ""})
        break
    return found


def run_trl(trl: Any, args: argparse.Namespace, ckpt: Path, base: Path) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback

    from kpop.policy.checkpoint import save_checkpoint
    from kpop.policy.tokenizer import load_tokenizer

    budget = args.minutes * 60.0
    t0 = time.perf_counter()

    class Budget(TrainerCallback):
        """Stop before a step that would end past the budget (the previous step's length predicts it)."""

        def __init__(self) -> None:
            self.last = t0

        def on_step_end(self, targs, state, control, **_: Any) -> None:
            now = time.perf_counter()
            step_s, self.last = now - self.last, now
            if now - t0 + step_s > budget:
                control.should_training_stop = True

    tok = load_tokenizer(ckpt)
    model = make_adapter_class().from_pretrained(str(ckpt))
    rows = prompt_rows(range(args.seed * 1_000_003, args.seed * 1_000_003 + 4096))
    cfg = grpo_config(trl, args, base / "trl")
    trainer = trl.GRPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                              reward_funcs=lambda completion_ids, seed, **_: verifier_rewards(tok, completion_ids, seed),
                              callbacks=[Budget()])
    trainer.remove_callback(PrinterCallback)  # stdout is for the result (--json); steps go to the log
    trainer.train()
    wall = time.perf_counter() - t0
    steps = trainer.state.global_step
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    flat = [h["frac_reward_zero_std"] for h in trainer.state.log_history if "frac_reward_zero_std" in h]
    step_s = [h["step_time"] for h in trainer.state.log_history if "step_time" in h][1:]  # the first pays warm-up
    out = base / "trl" / "policy"
    save_checkpoint(model, out)
    tok.save_pretrained(out)
    return {"wall_s": round(wall, 1), "learner_steps": steps, "optimizer_updates": steps, "trajectories": steps * args.batch,
            "trajectories_per_s": round(steps * args.batch / wall, 3),
            "train_reward_first": rewards[0] if rewards else None, "train_reward_last": rewards[-1] if rewards else None,
            "no_signal_frac": round(statistics.fmean(flat), 3) if flat else None,
            "steady_trajectories_per_s": round(args.batch * len(step_s) / sum(step_s), 3) if step_s else None,
            "policy": str(out)}


# -- KPop ----------------------------------------------------------------------------------------

def kpop_config(args: argparse.Namespace, base: Path, name: str, extra: Sequence[str]) -> Path:
    """A run config (quickstart + this task), written to a file for `kpop train`."""
    from kpop.config import dump_config, load_config

    spec = lambda split: json.dumps({"id": ENV_ID, "kwargs": {"split": split}})  # noqa: E731
    cfg = load_config(ROOT / "configs/quickstart.yaml", [
        f"name={name}", f"run_dir={base}", f"seed={args.seed}", f"environments.train=[{spec('train')}]",
        f"environments.eval=[{spec('eval')}]", "rollout.max_turns=1", f"rollout.max_new_tokens={args.max_new_tokens}",
        f"rollout.group_size={args.group}", f"schedule.batch_size={args.batch}", f"learner.lr={args.lr}",
        "learner.lr_schedule=constant", f"learner.warmup_steps={args.warmup}", f"learner.sft_steps={args.sft_steps}",
        # the bench evaluates every policy itself (one procedure for both sides): the controller's own
        # eval is cut to one seed
        "schedule.eval_before_rl=false", "environments.eval_seeds=1", "schedule.eval_samples=0",
        "logging.tensorboard=false", "logging.progress=false", *extra])
    path = base / f"{name}.yaml"
    path.write_text(dump_config(cfg))
    return path


def kpop_train(config: Path, overrides: Sequence[str] = (), budget_s: float | None = None) -> float:
    """`kpop train CONFIG`; with a budget, SIGTERM (which the CLI unwinds cleanly) at the deadline."""
    cmd = [sys.executable, "-m", "kpop.cli.main", "train", str(config), *overrides]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        proc.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return time.perf_counter() - t0


def checkpoint_version(run_dir: Path) -> int:
    """Policy version of the newest learner checkpoint (tag `v<version>` in checkpoints/latest)."""
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    return int(tag.lstrip("v"))


def run_kpop(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    from kpop.metrics import read_metrics

    run_dir = base / "kpop"
    shutil.copytree(base / "sft" / "checkpoints", run_dir / "checkpoints")  # resume from the shared SFT policy
    v0 = checkpoint_version(run_dir)
    config = kpop_config(args, base, "kpop", ["schedule.rl_steps=100000", "learner.checkpoint_every=1"])
    wall = kpop_train(config, budget_s=args.minutes * 60.0)
    # The newest checkpoint is the policy kept. Its version counts optimizer updates (a step whose
    # groups were all filtered out updates nothing); the controller's steps are the logged rows up
    # to the first one at that version (a later row at the same version changed no weights).
    version = checkpoint_version(run_dir)
    rows = sorted(read_metrics(run_dir, phase="rl"), key=lambda r: r["step"])
    kept = [r for r in rows if r["version"] < version]
    kept += [r for r in rows if r["version"] == version][:1]
    steps = len(kept)
    # export that checkpoint as an HF policy: the same config, stopping at the steps done (a resume
    # past rl_steps trains no more)
    kpop_train(config, [f"schedule.rl_steps={steps}"])
    last = kept[-1] if kept else {}
    consumed = int(last.get("consumed", 0))
    return {"wall_s": round(wall, 1), "learner_steps": steps, "optimizer_updates": version - v0,
            "trajectories": consumed, "trajectories_per_s": round(consumed / wall, 3),
            "train_reward_first": kept[0]["reward_mean"] if kept else None,
            "train_reward_last": last.get("reward_mean"), "policy": str(run_dir / "policy"),
            "no_signal_frac": round(sum(r["filtered"] for r in kept) / max(1, sum(r["trajectories"] for r in kept)), 3),
            # after the first step (start-up and warm-up excluded), as for TRL
            "steady_trajectories_per_s": (round((last["consumed"] - kept[0]["consumed"]) / (last["time"] - kept[0]["time"]), 3)
                                          if len(kept) > 1 else None)}


# -- eval ----------------------------------------------------------------------------------------

def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (0 for a single value)."""
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def held_out(policy: Path, args: argparse.Namespace) -> dict[str, float]:
    """Greedy and sampled mean reward on the held-out seeds, each with its standard error over
    seeds (sampled: the per-seed mean of `eval_samples` episodes is one observation)."""
    from kpop.evaluate import evaluate

    common = dict(env_kwargs={"split": "eval"}, seed=EVAL_SEED0, max_new_tokens=args.max_new_tokens, max_turns=1,
                  max_episode_tokens=256, concurrency=64)
    greedy = evaluate(policy, ENV_ID, args.eval_episodes, samples=1, temperature=0.0, **common)
    sampled = evaluate(policy, ENV_ID, args.eval_episodes, samples=args.eval_samples, temperature=1.0, **common)
    per_seed: dict[int, list[float]] = {}
    for r in sampled.results:
        per_seed.setdefault(r.seed, []).append(r.reward)
    g, g_se = mean_se([r.reward for r in greedy.results])
    s, s_se = mean_se([statistics.fmean(v) for v in per_seed.values()])
    return {"greedy": round(g, 4), "greedy_se": round(g_se, 4), "sampled": round(s, 4), "sampled_se": round(s_se, 4)}


# -- main ----------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print only the final JSON object")
    ap.add_argument("--record", action="store_true", help="add the result to bench/RESULTS.md (## vs_trl)")
    ap.add_argument("--minutes", type=float, default=4.0, help="wall-clock training budget per side")
    ap.add_argument("--sft-steps", type=int, default=250, help="shared cold-start SFT (short: leaves room for RL)")
    ap.add_argument("--batch", type=int, default=32, help="trajectories per learner step, both sides")
    ap.add_argument("--group", type=int, default=4, help="samples per prompt (GRPO group), both sides")
    ap.add_argument("--lr", type=float, default=5e-4, help="RL learning rate, both sides (the quickstart's)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--eval-episodes", type=int, default=64, help="held-out seeds")
    ap.add_argument("--eval-samples", type=int, default=4, help="sampled episodes per held-out seed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trl-dir", type=Path, default=TRL_DIR, help="where TRL is installed (outside the venv)")
    ap.add_argument("--install-trl", action="store_true", help="pip install the pinned TRL into --trl-dir if missing")
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp dir, removed)")
    args = ap.parse_args()
    if args.batch % args.group:
        ap.error(f"--batch ({args.batch}) must be a multiple of --group ({args.group})")
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    trl = import_trl(args.trl_dir, args.install_trl)  # fail before any training if TRL is missing

    base = (args.out or Path(tempfile.mkdtemp(prefix="kpop-vs-trl-"))).resolve()
    base.mkdir(parents=True, exist_ok=True)
    register_env(base / "plugin")
    t_start, load_start = time.time(), os.getloadavg()[0]
    try:
        t = time.perf_counter()
        kpop_train(kpop_config(args, base, "sft", ["schedule.rl_steps=0"]))
        sft_s = time.perf_counter() - t
        start = base / "sft" / "policy"
        log.info("SFT done in %.0f s; eval of the starting policy", sft_s)
        before = held_out(start, args)
        log.info("before: %s; TRL probe of the plain model", before)
        probe = trl_probe(trl, args, start, base)
        log.info("probe: %s; KPop for %.1f min", probe, args.minutes)
        kpop = run_kpop(args, base)
        kpop["after"] = held_out(Path(kpop.pop("policy")), args)
        log.info("kpop: %s; TRL for %.1f min", kpop, args.minutes)
        trl_side = run_trl(trl, args, start, base)
        trl_side["after"] = held_out(Path(trl_side.pop("policy")), args)
        log.info("trl: %s", trl_side)
    finally:
        if args.out is None:
            shutil.rmtree(base, ignore_errors=True)
    import accelerate
    import datasets
    import torch
    import transformers

    result = {"task": ENV_ID, "minutes": args.minutes, "sft_steps": args.sft_steps, "sft_wall_s": round(sft_s, 1),
              "batch": args.batch, "group": args.group, "lr": args.lr, "eval_episodes": args.eval_episodes,
              "eval_samples": args.eval_samples, "before": before, "kpop": kpop, "trl": trl_side,
              "trl_as_registered": probe, "total_wall_s": round(time.time() - t_start, 1),
              "load_average": [round(load_start, 1), round(os.getloadavg()[0], 1)],
              "versions": {"trl": trl.__version__, "accelerate": accelerate.__version__, "datasets": datasets.__version__,
                           "torch": torch.__version__, "transformers": transformers.__version__}}
    if not args.json:
        for side in ("kpop", "trl"):
            r, a = result[side], result[side]["after"]
            print(f"{side:>4}: {r['learner_steps']} steps in {r['wall_s']} s, {r['trajectories_per_s']} traj/s; held-out "
                  f"greedy {before['greedy']:.3f} -> {a['greedy']:.3f}, sampled {before['sampled']:.3f} -> {a['sampled']:.3f}")
    print(json.dumps(result))
    if args.record:
        record(args, result)


def record(args: argparse.Namespace, result: dict) -> None:
    from bench import results as bench_results

    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "PYTHONPATH=. python bench/vs_trl.py " + " ".join(sys.argv[1:])
    b, load = result["before"], result["load_average"]
    lines = [f"`{cmd}` on {when}, {os.cpu_count()} CPUs ({platform.machine()}) shared with other engineers' jobs "
             f"(load average {load[0]} at the start, {load[1]} at the end), {result['total_wall_s']} s in all. Task {ENV_ID} (tool-use d0 in one turn), quickstart policy "
             f"(small, fp32), shared SFT {result['sft_steps']} steps, then {result['minutes']} min per side, batch "
             f"{result['batch']} (groups of {result['group']}), lr {result['lr']}. Held-out: {result['eval_episodes']} "
             f"seeds greedy + {result['eval_samples']} samples/seed at T=1, same function for both; +- is the standard "
             f"error over seeds. Versions: {json.dumps(result['versions'])}.", "",
             "| side | learner steps (updates) | wall s | trajectories/s (after step 1) | no-signal groups "
             "| train reward first -> last | held-out greedy before -> after | sampled before -> after |",
             "|---|---|---|---|---|---|---|---|"]
    for side in ("kpop", "trl"):
        r, a = result[side], result[side]["after"]
        tr = " -> ".join("-" if x is None else f"{x:.3f}" for x in (r["train_reward_first"], r["train_reward_last"]))
        lines.append(f"| {side} | {r['learner_steps']} ({r['optimizer_updates']}) | {r['wall_s']} | "
                     f"{r['trajectories_per_s']} ({r['steady_trajectories_per_s']}) | "
                     f"{r['no_signal_frac']} | {tr} | "
                     f"{b['greedy']:.3f}+-{b['greedy_se']:.3f} -> {a['greedy']:.3f}+-{a['greedy_se']:.3f} | "
                     f"{b['sampled']:.3f}+-{b['sampled_se']:.3f} -> {a['sampled']:.3f}+-{a['sampled_se']:.3f} |")
    lines += ["", "The TRL row trains through the bench's `TRLAdapter` (packs padded rows with cu_seqlens, passes the "
              "mask to generation). TRL with the model as registered (`AutoModelForCausalLM`), one step each:"]
    lines += [f"- {p['config']}: {p['error'] or 'ran'}" for p in result["trl_as_registered"]]
    bench_results.record("vs_trl", when, lines)


if __name__ == "__main__":
    main()
