"""Training-inference mismatch with and without MoE routing replay (a benchmark, not a test).

    PYTHONPATH=. python bench/mismatch.py [--json] [--preset tiny] [--prompts 16] [--new-tokens 48] [--record]

The same rollouts of one policy (the embedded engine, sampling at temperature 1, eos ignored)
are scored by the learner twice: replaying the experts the engine recorded per token, and with
the learner's own router. Per sampled token, |delta logprob| = |learner - engine|, and the mask
rate is the share of tokens KPop's binary-KL test (algorithm.kpop_phi) would mask.

Two sources of mismatch, each reported:
* `bf16`: the engine runs a bf16 copy of the weights, the learner fp32 (CPU; on a GPU the engine
  runs bf16 and so does the learner: kernel and cached-decode differences are the mismatch).
* `router`: engine and learner share fp32 weights but every router's `expert_bias` moves by
  uniform noise of `--bias-noise` between rollout and learning: a stand-in for the load
  balancing update that moves it between the rollout and the step that trains on it.

Keys (per mode, and the first mode's at the top level): `mean_abs_dlogp_ratio` (without / with
replay), `mask_rate_ratio` (without / with; null when replay leaves no token masked, so the ratio
is unbounded, and with no mask either way), the raw means, max and mask rates, and
`route_flip_rate` (share of token x MoE-layer routes the learner's router picks differently).
--record adds a dated entry under "## mismatch" in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import results  # noqa: E402
from kpop.algo.losses import kpop_keep  # noqa: E402
from kpop.config import AlgorithmConfig, LearnerConfig  # noqa: E402
from kpop.policy.checkpoint import build_model  # noqa: E402
from kpop.policy.config import BailingHybridConfig  # noqa: E402
from kpop.policy.presets import PRESETS  # noqa: E402
from kpop.rollout.embedded import EmbeddedEngine  # noqa: E402
from kpop.rollout.engine import GenerationRequest, SamplingParams  # noqa: E402
from learner.learner import Learner  # noqa: E402


def rollouts(model, prompts: list[list[int]], new: int) -> list:
    engine = EmbeddedEngine(model, max_seqs=len(prompts))
    try:
        params = [SamplingParams(max_tokens=new, ignore_eos=True, seed=i) for i in range(len(prompts))]
        return engine.generate([GenerationRequest(prompt_token_ids=p, params=s) for p, s in zip(prompts, params)])
    finally:
        engine.close()


def score(learner: Learner, results_: list, replay: bool, phi: float) -> dict:
    seqs = [r.prompt_token_ids + r.token_ids for r in results_]
    lps = learner.logprobs(seqs, routes=[r.routes for r in results_] if replay else None)
    train, infer = [], []
    for r, lp in zip(results_, lps):
        n = len(r.prompt_token_ids)
        train.append(lp[n - 1 :].float())  # lp[t-1] = log p(x_t | x_<t)
        infer.append(torch.tensor(r.logprobs))
    train, infer = torch.cat(train), torch.cat(infer)
    d = (train - infer).abs()
    return {"mean_abs_dlogp": float(d.mean()), "max_abs_dlogp": float(d.max()),
            "mask_rate": float(1 - kpop_keep(train, infer, phi).float().mean()), "tokens": int(d.numel())}


def flip_rate(learner: Learner, results_: list) -> float:
    module = learner.engine.module
    flips = total = 0
    with torch.no_grad():
        for r in results_:
            ids = r.prompt_token_ids + r.token_ids
            own = module(torch.tensor([ids], device=learner.device), return_expert_ids=True,
                         return_logits=False).expert_ids[:-1].cpu().sort(-1).values
            rec = r.routes.ids()[:-1].sort(-1).values
            flips += int((own != rec).any(-1).sum())
            total += own.shape[0] * own.shape[1]
    return flips / max(total, 1)


def ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def run_mode(mode: str, base, prompts, args, cuda: bool) -> dict:
    dev = "cuda" if cuda else "cpu"
    rollout_model = copy.deepcopy(base)
    learner_model = copy.deepcopy(base)
    if mode == "bf16":
        rollout_model = rollout_model.to(dev, torch.bfloat16)
    else:
        rollout_model = rollout_model.to(dev)
        g = torch.Generator().manual_seed(args.seed + 1)
        with torch.no_grad():
            for layer in learner_model.model.layers:
                gate = getattr(layer.mlp, "gate", None)
                if gate is not None:
                    gate.expert_bias.add_((torch.rand(gate.expert_bias.shape, generator=g) - 0.5) * 2 * args.bias_noise)
    res = rollouts(rollout_model.eval(), prompts, args.new_tokens)
    del rollout_model
    lcfg = LearnerConfig(zero_stage=0, micro_batch_tokens=max(len(r.prompt_token_ids) + len(r.token_ids) for r in res) * 4,
                         num_gpus=1 if cuda else 0, dtype="bfloat16" if cuda else "float32")
    algo = AlgorithmConfig(routing_replay=True)
    learner = Learner(lcfg, algo, learner_model)
    with_r, without = score(learner, res, True, algo.kpop_phi), score(learner, res, False, algo.kpop_phi)
    both_unmasked = with_r["mask_rate"] == 0 and without["mask_rate"] == 0
    return {
        "mode": mode,
        "mean_abs_dlogp_ratio": ratio(without["mean_abs_dlogp"], with_r["mean_abs_dlogp"]),
        "mask_rate_ratio": None if both_unmasked else ratio(without["mask_rate"], with_r["mask_rate"]),
        "with_replay": with_r,
        "without_replay": without,
        "route_flip_rate": flip_rate(learner, res),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--preset", default=None, help="policy preset (default: tiny on CPU, bench-2b on a GPU)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--bias-noise", type=float, default=0.05, help="router mode: expert_bias noise amplitude")
    ap.add_argument("--modes", default="bf16,router")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    preset = args.preset or ("bench-2b" if cuda else "tiny")
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    arch = PRESETS[preset]()  # each preset's own default vocabulary
    base = build_model(BailingHybridConfig(**arch), seed=args.seed).eval()
    g = torch.Generator().manual_seed(args.seed)
    vocab = base.config.vocab_size
    prompts = [torch.randint(2, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    out = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)", "preset": preset,
           "prompts": args.prompts, "new_tokens": args.new_tokens, "kpop_phi": AlgorithmConfig().kpop_phi, "modes": {}}
    for mode in args.modes.split(","):
        out["modes"][mode] = run_mode(mode, base, prompts, args, cuda)
    first = out["modes"][args.modes.split(",")[0]]
    out.update({k: first[k] for k in ("mean_abs_dlogp_ratio", "mask_rate_ratio")})
    if args.json:
        print(json.dumps(out))
    else:
        for m in out["modes"].values():
            print(f"{m['mode']:>6}: mean |dlogp| {m['without_replay']['mean_abs_dlogp']:.3e} -> "
                  f"{m['with_replay']['mean_abs_dlogp']:.3e} (x{m['mean_abs_dlogp_ratio']}), mask rate "
                  f"{m['without_replay']['mask_rate']:.4f} -> {m['with_replay']['mask_rate']:.4f}, "
                  f"route flips {m['route_flip_rate']:.3f}")
    if args.record:
        record(out, args)


def record(out: dict, args) -> None:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"`PYTHONPATH=. python bench/mismatch.py --json` on {when}, {out['device']}, preset {out['preset']}, "
            f"{out['prompts']} prompts x {out['new_tokens']} sampled tokens (temperature 1), learner "
            f"{'bf16' if 'cuda' in out['device'].lower() else 'fp32'}; router mode: expert_bias noise "
            f"+-{args.bias_noise}.", "",
            "| mode | mean abs dlogp without | with replay | ratio | max without | max with | mask rate without "
            "| with | ratio | route flips |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for m in out["modes"].values():
        w, r = m["without_replay"], m["with_replay"]
        fmt = lambda x: "n/a" if x is None else f"{x:.3g}"  # noqa: E731
        body.append(f"| {m['mode']} | {w['mean_abs_dlogp']:.3e} | {r['mean_abs_dlogp']:.3e} | "
                    f"{fmt(m['mean_abs_dlogp_ratio'])} | {w['max_abs_dlogp']:.3e} | {r['max_abs_dlogp']:.3e} | "
                    f"{w['mask_rate']:.4f} | {r['mask_rate']:.4f} | {fmt(m['mask_rate_ratio'])} | "
                    f"{m['route_flip_rate']:.3f} |")
    if any(m["mask_rate_ratio"] is None for m in out["modes"].values()):
        body += ["", f"mask_rate_ratio n/a: no token crossed KPop's binary-KL threshold (kpop_phi={out['kpop_phi']}) "
                 "with or without replay in those modes."]
    results.record("mismatch", f"{when}: {out['preset']}, {out['device']}", body)


if __name__ == "__main__":
    main()
