"""The DeepSpeed learner on CPU (gloo, fp32, one process) with the tiny Ring-2.6 preset.

Every learner starts from the same initial weights, so ZeRO stages, micro-batch splits and a
save/load round trip can be compared weight by weight.
"""

import functools

import pytest
import torch

from kpop.config import AlgorithmConfig, LearnerConfig
from kpop.policy.model import BailingMoeV2_5ForCausalLM
from kpop.policy.presets import tiny_config
from kpop.trajectory import Trajectory
from learner.learner import Learner, lr_factor
from learner.packing import pack, token_logprobs

torch.manual_seed(0)
_INIT = BailingMoeV2_5ForCausalLM(tiny_config()).state_dict()


def _model() -> BailingMoeV2_5ForCausalLM:
    model = BailingMoeV2_5ForCausalLM(tiny_config())
    model.load_state_dict(_INIT)
    return model


@functools.lru_cache(maxsize=None)
def _batch(seed: int, groups: int, group_size: int) -> tuple[Trajectory, ...]:
    g = torch.Generator().manual_seed(seed)
    episodes = []
    for k in range(groups):
        prompt = torch.randint(2, 1024, (6,), generator=g).tolist()
        for j in range(group_size):
            n = int(torch.randint(4, 14, (1,), generator=g))
            episodes.append((k, j, prompt, prompt + torch.randint(2, 1024, (n,), generator=g).tolist()))
    packed = pack([ids for *_, ids in episodes], list(range(len(episodes))))
    with torch.no_grad():  # one packed forward: the rollout engine's view at version 0
        ref = _model().eval()
        lp = token_logprobs(ref(packed.input_ids, cu_seqlens=packed.cu_seqlens).logits, packed.input_ids).tolist()
    out, cu = [], packed.cu_seqlens.tolist()
    for e, (k, j, prompt, ids) in enumerate(episodes):
        mask = [0] * len(prompt) + [1] * (len(ids) - len(prompt))
        logprobs = [x if m else 0.0 for x, m in zip(lp[cu[e] : cu[e + 1]], mask)]
        out.append(Trajectory(run_id="test", task_id=f"t{k}", env_id="test", group_id=f"g{seed}-{k}",
                              token_ids=ids, logprobs=logprobs, loss_mask=mask,
                              segments=[(len(prompt), len(ids), 0)], reward=float(j % 2) + 0.1 * j))
    return tuple(out)


def _trajectories(seed: int = 0, groups: int = 2, group_size: int = 4) -> list[Trajectory]:
    """Prompt + response episodes with on-policy rollout logprobs from the initial weights and
    varied rewards (fresh copies: tests may edit them)."""
    return [t.model_copy(deep=True) for t in _batch(seed, groups, group_size)]


def _learner(stage: int = 1, budget: int = 64, warmup: int = 0, **algo) -> Learner:
    lcfg = LearnerConfig(lr=1e-3, zero_stage=stage, micro_batch_tokens=budget, keep_checkpoints=2, warmup_steps=warmup)
    acfg = AlgorithmConfig(**{"correction": "kpop", "kpop_phi": 0.5, **algo})
    return Learner(lcfg, acfg, _model())


def _assert_same_weights(a: dict, b: dict, exact: bool = False, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=k)


def test_zero_stages_step_like_a_plain_step():
    batch = _trajectories()
    results = {}
    for stage in (0, 1, 2, 3):
        learner = _learner(stage)
        m = learner.train_step(batch)
        assert m["skipped"] == 0.0 and m["version"] == 1.0 and m["micro_batches"] >= 2
        results[stage], version = learner.export_weights()
        assert version == 1
    assert any(not torch.equal(results[0][k], _INIT[k]) for k in _INIT)  # the step moved the weights
    _assert_same_weights(results[1], results[0])
    _assert_same_weights(results[2], results[0])
    # ZeRO-3 sums gradients in another order; Adam turns a rounding difference on a near-zero
    # gradient into up to ~1% of one lr=1e-3 step
    _assert_same_weights(results[3], results[0], atol=5e-5)
    assert all(results[3][k].shape == _INIT[k].shape for k in _INIT)  # ZeRO-3 export is gathered


EPS32 = torch.finfo(torch.float32).eps


def _step_seen_by_the_optimizer(batch: list[Trajectory], budget: int) -> tuple[dict, dict, dict, float]:
    """(metrics, gradients the optimizer stepped on, weights after, Adam eps) of one train_step.
    ZeRO stage 0: the torch AdamW steps on the model's own .grad tensors, after clipping."""
    learner = _learner(stage=0, budget=budget)
    names = {p: n for n, p in learner.engine.module.named_parameters()}
    grads: dict[str, torch.Tensor] = {}

    def keep(opt, args, kwargs):
        grads.update({names[p]: p.grad.detach().clone() for g in opt.param_groups for p in g["params"]
                      if p.grad is not None})

    learner.optimizer.register_step_pre_hook(keep)
    metrics = learner.train_step(batch)
    return metrics, grads, learner.export_weights()[0], learner.optimizer.param_groups[0]["eps"]


def test_micro_batch_split_does_not_change_the_step():
    """One micro-batch vs many: the same loss and gradients up to fp32 rounding, and weights that
    differ by no more than Adam's first step turns those rounding differences into.

    Bounds, from the arithmetic:
    - loss and each gradient tensor are sums over the batch's R tokens, re-associated by the split:
      |difference| <= R * eps32 * magnitude (the recursive-summation bound, R*eps relative);
    - Adam's first step moves a weight by lr * g / (|g| + eps_adam) (bias-corrected moments), a
      function whose slope is up to 1/eps_adam near g = 0: a rounding difference in a near-zero
      gradient is amplified, so each weight is compared against lr * |f(g_one) - f(g_many)| plus
      the rounding of the update itself (a few eps32 of lr and of the weight).
    """
    batch = _trajectories(seed=1)
    m1, g1, w1, adam_eps = _step_seen_by_the_optimizer(batch, budget=256)
    m2, g2, w2, _ = _step_seen_by_the_optimizer(batch, budget=24)
    assert m1["micro_batches"] == 1 and m2["micro_batches"] >= 4
    reduction = sum(t.num_tokens for t in batch)
    tol = reduction * EPS32
    assert abs(m1["loss"] - m2["loss"]) <= tol * abs(m1["loss"]), (m1["loss"], m2["loss"], tol)
    assert g1.keys() == g2.keys() and g1
    for name in g1:
        diff, norm = float((g1[name] - g2[name]).norm()), float(g1[name].norm())
        assert diff <= tol * norm, f"{name}: gradient differs by {diff:.3g}, bound {tol:.3g} x |g| {norm:.3g}"

    lr = m1["lr"]
    for name in w1.keys() - g1.keys():  # buffers, and parameters the RL loss does not reach (MTP)
        assert torch.equal(w1[name], w2[name]), name
    for name in g1:
        a, b = g1[name].double(), g2[name].double()
        amplified = lr * (a / (a.abs() + adam_eps) - b / (b.abs() + adam_eps)).abs()
        bound = amplified + 8 * EPS32 * lr + 2 * EPS32 * w1[name].double().abs()
        excess = (w1[name].double() - w2[name].double()).abs() - bound
        worst = int(excess.argmax())
        assert excess.max() <= 0, (f"{name}[{worst}]: weights {float(w1[name].flatten()[worst]):.9g} vs "
                                   f"{float(w2[name].flatten()[worst]):.9g}, bound {float(bound.flatten()[worst]):.3g}")


@pytest.mark.parametrize("loss", ["ppo", "gspo"])
def test_policy_moves_toward_positive_advantages(loss):
    batch = _trajectories(seed=2)
    learner = _learner(loss=loss, clip_low=0.2, clip_high=0.28)
    before = learner.logprobs([t.token_ids for t in batch])
    for _ in range(4):
        m = learner.train_step(batch)
    after = learner.logprobs([t.token_ids for t in batch])
    adv_sign, moved = [], []
    for t, b, a in zip(batch, before, after):
        mask = torch.tensor(t.loss_mask[1:], dtype=torch.bool)
        moved.append(float((a - b)[mask].sum()))
        mean = sum(u.reward for u in batch if u.group_id == t.group_id) / 4
        adv_sign.append(t.reward > mean)
    up = [d for d, s in zip(moved, adv_sign) if s]
    down = [d for d, s in zip(moved, adv_sign) if not s]
    assert min(up) > 0 > max(down), (up, down)
    assert 0.0 <= m["mask_rate"] <= 1.0 and m["dlogp_max"] >= 0.0


def test_sft_loss_decreases_on_a_fixed_batch():
    learner = _learner()
    batch = [(t.token_ids, t.loss_mask) for t in _trajectories(seed=3)]
    losses = [learner.sft_step(batch)["sft_loss"] for _ in range(5)]
    assert losses[-1] < losses[0] - 0.5, losses
    assert learner.version == 5


def test_zero_variance_batch_is_skipped_without_a_step():
    batch = _trajectories(seed=4)
    for t in batch:
        t.reward = 1.0
    learner = _learner()
    m = learner.train_step(batch)
    assert m["skipped"] == 1.0 and m["filtered"] == len(batch) and learner.version == 0
    _assert_same_weights(learner.export_weights()[0], _INIT, exact=True)


@pytest.mark.parametrize("stage", [1, 3])
def test_resume_continues_identically(tmp_path, stage):
    # N=3 steps straight == 1 step, save, a new learner loads, 2 steps. Warmup makes every step's
    # lr differ, so a lost schedule position shows as well as lost Adam moments.
    batches = [_trajectories(seed=10 + i) for i in range(3)]
    straight = _learner(stage, warmup=3)
    for b in batches:
        straight.train_step(b)

    first = _learner(stage, warmup=3)
    first.train_step(batches[0])
    first.save(tmp_path / "ckpt", extra={"acked": ["a", "b"], "offset": "17-0"})
    del first
    resumed = _learner(stage, warmup=3)
    extra = resumed.load(tmp_path / "ckpt")
    assert extra == {"acked": ["a", "b"], "offset": "17-0"} and resumed.version == 1
    lrs = [resumed.train_step(b)["lr"] for b in batches[1:]]
    assert lrs == pytest.approx([2e-3 / 3, 1e-3])
    a, va = straight.export_weights()
    b, vb = resumed.export_weights()
    assert va == vb == 3
    _assert_same_weights(a, b, exact=True)


def test_checkpoints_are_pruned_and_missing_checkpoint_is_named(tmp_path):
    learner = _learner()
    batch = _trajectories(seed=5)
    for _ in range(3):
        learner.train_step(batch)
        learner.save(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("v*")) == ["v00000002", "v00000003"]
    with pytest.raises(FileNotFoundError, match="no learner checkpoint"):
        _learner().load(tmp_path / "nothing")


def test_bad_input_is_named():
    learner = _learner()
    t = _trajectories(seed=6, groups=1, group_size=2)
    bad = t[0].model_copy(update={"loss_mask": [1] + t[0].loss_mask[1:]})
    with pytest.raises(ValueError, match="first token is a loss token"):
        learner.train_step([bad, t[1]])
    with pytest.raises(ValueError, match="needs token_texts"):
        _learner(loss="lpo")


def test_lpo_step_with_sentence_units():
    lcfg = LearnerConfig(lr=1e-3, zero_stage=1, micro_batch_tokens=64)
    texts = lambda ids: ["." if i % 5 == 0 else "w" for i in ids]  # noqa: E731  a pause every ~5th token
    learner = Learner(lcfg, AlgorithmConfig(loss="lpo", correction="icepop"), _model(), token_texts=texts)
    m = learner.train_step(_trajectories(seed=7))
    assert m["skipped"] == 0.0 and m["loss_tokens"] > 0


def test_lr_schedule():
    assert [lr_factor(s, 2, "constant", None) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 2, "cosine", 12) == 1.0 and lr_factor(12, 2, "cosine", 12) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="cosine.*total_steps"):
        lr_factor(3, 0, "cosine", None)
