"""Training-inference mismatch with and without MoE routing replay (a benchmark, not a test).

    PYTHONPATH=. python bench/mismatch.py [--json] [--preset tiny] [--prompts 16] [--new-tokens 48] [--record]
                                          [--kpop-phi 0.5] [--phis 1e-3,1e-5,1e-7] [--icepop 0.99,1.01]

The same rollouts of one policy (the embedded engine, sampling at temperature 1, eos ignored)
are scored by the learner twice: replaying the experts the engine recorded per token, and with
the learner's own router. Per sampled token, |delta logprob| = |learner - engine|, and the mask
rate is the share of tokens KPop's binary-KL test (`--kpop-phi`, default algorithm.kpop_phi) would
mask. `mask_rate_ratio_by_setting` adds the rates at smaller KPop thresholds (`--phis`) and at IcePop
windows (`--icepop`, repeatable): a small random policy gives every token p ~ 1/vocab, so its binary
KLs are tiny whatever the logprob gap, while IcePop's ratio test does not depend on p.

On CPU everything is fp32 but the `bf16` mode's engine; with CUDA the default preset is bench-2b and
both the engine and the learner run bf16 (the issue's GPU goal: both ratios >= 5).

Two sources of mismatch, each reported:
* `bf16`: the engine runs a bf16 copy of the weights, the learner fp32 (CPU; on a GPU the engine
  runs bf16 and so does the learner: kernel and cached-decode differences are the mismatch).
* `router`: engine and learner share weights (fp32 on CPU, bf16 on a GPU) but every router's `expert_bias` moves by
  uniform noise of `--bias-noise` between rollout and learning: a stand-in for the load
  balancing update that moves it between the rollout and the step that trains on it.

Keys (per mode, and the first mode's at the top level): `mean_abs_dlogp_ratio` (without / with
replay), `mask_rate_ratio` (without / with; null when replay leaves no token masked, so the ratio
is unbounded, and with no mask either way), the raw means, max and mask rates, and
`route_flip_rate` (share of token x MoE-layer routes the learner's router picks differently), split
as `route_flip_rate_lightning` / `_mla` by the attention of the MoE layer's block.
--record adds a dated entry under "## mismatch" in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import results  # noqa: E402
from kpop.algo.losses import icepop_keep, kpop_keep  # noqa: E402
from kpop.config import AlgorithmConfig, LearnerConfig  # noqa: E402
from kpop.policy.checkpoint import build_model  # noqa: E402
from kpop.policy.config import BailingHybridConfig  # noqa: E402
from kpop.policy.presets import PRESETS  # noqa: E402
from kpop.replay import parse_icepop  # noqa: E402
from kpop.rollout.embedded import EmbeddedEngine  # noqa: E402
from kpop.rollout.engine import GenerationRequest, SamplingParams  # noqa: E402
from learner.learner import Learner, route_flips  # noqa: E402


def rollouts(model, prompts: list[list[int]], new: int) -> list:
    engine = EmbeddedEngine(model, max_seqs=len(prompts))
    try:
        params = [SamplingParams(max_tokens=new, ignore_eos=True, seed=i) for i in range(len(prompts))]
        return engine.generate([GenerationRequest(prompt_token_ids=p, params=s) for p, s in zip(prompts, params)])
    finally:
        engine.close()


def score(learner: Learner, results_: list, replay: bool, phis: list[float],
          windows: list[tuple[float, float]]) -> dict:
    """Per sampled token |learner - engine| logprob; mask rates at each KPop phi (the first is the
    main one) and IcePop window."""
    seqs = [r.prompt_token_ids + r.token_ids for r in results_]
    lps = learner.logprobs(seqs, routes=[r.routes for r in results_] if replay else None)
    train, infer = [], []
    for r, lp in zip(results_, lps):
        n = len(r.prompt_token_ids)
        train.append(lp[n - 1 :].float())  # lp[t-1] = log p(x_t | x_<t)
        infer.append(torch.tensor(r.logprobs))
    train, infer = torch.cat(train).double(), torch.cat(infer).double()  # fp64: no rounding in the KL test itself
    d = (train - infer).abs()
    rates = {f"kpop {phi:g}": float(1 - kpop_keep(train, infer, phi).float().mean()) for phi in phis}
    rates.update({f"icepop {a:g},{b:g}": float(1 - icepop_keep(train, infer, a, b).float().mean()) for a, b in windows})
    return {"mean_abs_dlogp": float(d.mean()), "max_abs_dlogp": float(d.max()),
            "mask_rate": rates[f"kpop {phis[0]:g}"], "mask_rates": rates, "tokens": int(d.numel())}


def flip_rates(learner: Learner, results_: list) -> dict[str, float]:
    """Share of (token, MoE layer) routes the learner's router (a full forward, no replay) picks
    differently from the engine's record: overall and by the attention of the layer's block."""
    module = learner.engine.module
    kinds = module.config.mixer_types()
    mla = torch.tensor([kinds[i] == "attention" for i in module.moe_layers()])
    flipped, pairs = torch.zeros(2), torch.zeros(2)
    with torch.no_grad():
        for r in results_:
            ids = r.prompt_token_ids + r.token_ids
            own = module(torch.tensor([ids], device=learner.device), return_expert_ids=True,
                         return_logits=False).expert_ids.cpu()
            rec = r.routes.ids()
            f = route_flips(own, rec)  # tokens without a recorded route (the last one) never flip
            known = int((rec[:, 0, 0] >= 0).sum())
            flipped += torch.stack([f[:, ~mla].sum(), f[:, mla].sum()]).float()
            pairs += known * torch.stack([(~mla).sum(), mla.sum()]).float()
    out = {"route_flip_rate": float(flipped.sum() / pairs.sum().clamp(min=1))}
    for kind, f, n in zip(("lightning", "mla"), flipped.tolist(), pairs.tolist()):
        if n:
            out[f"route_flip_rate_{kind}"] = f / n
    return out


def ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def run_mode(mode: str, base, prompts, args, cuda: bool) -> dict:
    dev = "cuda" if cuda else "cpu"
    rollout_model = copy.deepcopy(base)
    learner_model = copy.deepcopy(base)
    if mode == "bf16" or cuda:  # on a GPU both sides run bf16 in every mode, as in training
        rollout_model = rollout_model.to(dev, torch.bfloat16)
    else:
        rollout_model = rollout_model.to(dev)
    if mode == "router":
        g = torch.Generator().manual_seed(args.seed + 1)
        with torch.no_grad():
            for layer in learner_model.model.layers:
                gate = getattr(layer.mlp, "gate", None)
                if gate is not None:
                    gate.expert_bias.add_((torch.rand(gate.expert_bias.shape, generator=g) - 0.5) * 2 * args.bias_noise)
    res = rollouts(rollout_model.eval(), prompts, args.new_tokens)
    del rollout_model
    # on a GPU the configuration the GPU learner tests run (bf16 under ZeRO-2)
    lcfg = LearnerConfig(zero_stage=2 if cuda else 0,
                         micro_batch_tokens=max(len(r.prompt_token_ids) + len(r.token_ids) for r in res) * 4,
                         num_gpus=1 if cuda else 0, dtype="bfloat16" if cuda else "float32")
    algo = AlgorithmConfig(routing_replay=True)
    learner = Learner(lcfg, algo, learner_model)
    phis = [args.kpop_phi, *args.phis]
    with_r, without = score(learner, res, True, phis, args.icepop), score(learner, res, False, phis, args.icepop)
    out = {
        "mode": mode,
        "mean_abs_dlogp_ratio": ratio(without["mean_abs_dlogp"], with_r["mean_abs_dlogp"]),
        "mask_rate_ratio": mask_ratio(without["mask_rate"], with_r["mask_rate"]),
        "mask_rate_ratio_by_setting": {k: mask_ratio(without["mask_rates"][k], with_r["mask_rates"][k])
                                   for k in with_r["mask_rates"]},
        "with_replay": with_r,
        "without_replay": without,
        **flip_rates(learner, res),
    }
    del learner, learner_model  # the next mode builds its own learner: free this one's GPU memory first
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def mask_ratio(without: float, with_replay: float) -> float | None:
    """without / with replay; None when nothing is masked either way (no information) or only
    without replay (unbounded)."""
    return None if without == 0 and with_replay == 0 else ratio(without, with_replay)


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
    ap.add_argument("--kpop-phi", type=float, default=AlgorithmConfig().kpop_phi, help="KPop threshold of mask_rate")
    ap.add_argument("--phis", default="1e-3,1e-5,1e-7", help="more KPop thresholds for mask_rate_ratio_by_setting")
    ap.add_argument("--icepop", action="append", type=parse_icepop, default=None, metavar="ALPHA,BETA",
                    help="IcePop windows for mask_rate_ratio_by_setting (repeatable; default 0.99,1.01 and 0.5,5)")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    args.phis = [float(x) for x in args.phis.split(",") if x.strip()]
    args.icepop = args.icepop or [(0.99, 1.01), (0.5, 5.0)]
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
           "prompts": args.prompts, "new_tokens": args.new_tokens, "kpop_phi": args.kpop_phi,
           "learner_dtype": "bf16" if cuda else "fp32", "modes": {}}
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
                  f"route flips {m['route_flip_rate']:.3f}; mask rate ratios {m['mask_rate_ratio_by_setting']}")
    if args.record:
        record(out, args)


def record(out: dict, args) -> None:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    fmt = lambda x: "n/a" if x is None else f"{x:.3g}"  # noqa: E731
    body = [f"`PYTHONPATH=. python bench/mismatch.py --json --record` on {when}, {out['device']}, preset "
            f"{out['preset']}, {out['prompts']} prompts x {out['new_tokens']} sampled tokens (temperature 1), learner "
            f"{out['learner_dtype']}; router mode: expert_bias noise +-{args.bias_noise}; "
            f"kpop_phi {out['kpop_phi']}.", "",
            "| mode | mean abs dlogp without | with replay | ratio | max without | max with | mask rate without "
            "| with | ratio | route flips (Lightning / MLA) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for m in out["modes"].values():
        w, r = m["without_replay"], m["with_replay"]
        split = " / ".join(fmt(m.get(f"route_flip_rate_{k}")) for k in ("lightning", "mla"))
        body.append(f"| {m['mode']} | {w['mean_abs_dlogp']:.3e} | {r['mean_abs_dlogp']:.3e} | "
                    f"{fmt(m['mean_abs_dlogp_ratio'])} | {w['max_abs_dlogp']:.3e} | {r['max_abs_dlogp']:.3e} | "
                    f"{w['mask_rate']:.4f} | {r['mask_rate']:.4f} | {fmt(m['mask_rate_ratio'])} | "
                    f"{m['route_flip_rate']:.3f} ({split}) |")
    names = list(next(iter(out["modes"].values()))["mask_rate_ratio_by_setting"])
    body += ["", "Mask rates under other settings (without -> with replay, ratio):", "",
             "| mode | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m in out["modes"].values():
        w, r = m["without_replay"]["mask_rates"], m["with_replay"]["mask_rates"]
        body.append(f"| {m['mode']} | " + " | ".join(
            f"{w[k]:.4f} -> {r[k]:.4f} ({'unbounded' if v is None and w[k] > 0 else fmt(v)})"
            for k, v in m["mask_rate_ratio_by_setting"].items()) + " |")
    if any(m["mask_rate_ratio"] is None for m in out["modes"].values()):
        body += ["", f"mask_rate_ratio n/a: no token crossed KPop's binary-KL threshold (kpop_phi={out['kpop_phi']}) "
                 "with or without replay in those modes."]
    results.record("mismatch", f"{when}: {out['preset']}, {out['device']}", body)


if __name__ == "__main__":
    main()
