"""The learner on one GPU: NCCL, bf16, ZeRO-2, the tiny Ring-2.6 preset. Skips without CUDA."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def groups(seed: int) -> list:
    """2 groups of 4 trajectories: a 16-token prompt, 48 random response tokens, rewards 0/1."""
    from kpop.trajectory import Trajectory

    g = torch.Generator().manual_seed(seed)
    batch = []
    for k in range(2):
        prompt = torch.randint(2, 1024, (16,), generator=g).tolist()
        for j in range(4):
            ids = prompt + torch.randint(2, 1024, (48,), generator=g).tolist()
            mask = [0] * 16 + [1] * 48
            batch.append(Trajectory(run_id="gpu", task_id=f"t{k}", env_id="test", group_id=f"g{k}", token_ids=ids,
                                    logprobs=[-6.9 * m for m in mask], loss_mask=mask, reward=float(j % 2)))
    return batch


def test_bf16_zero2_steps_on_gpu(tmp_path):
    from kpop.config import AlgorithmConfig, LearnerConfig
    from kpop.policy.model import BailingMoeV2_5ForCausalLM
    from kpop.policy.presets import tiny_config
    from learner.learner import Learner

    torch.manual_seed(0)
    batch = groups(seed=0)
    lcfg = LearnerConfig(lr=1e-3, zero_stage=2, dtype="bfloat16", num_gpus=1, micro_batch_tokens=256)
    learner = Learner(lcfg, AlgorithmConfig(correction="kpop", kpop_phi=2.0), BailingMoeV2_5ForCausalLM(tiny_config()))
    assert learner.device.type == "cuda"
    before, _ = learner.export_weights()
    for _ in range(3):
        m = learner.train_step(batch)
    assert m["skipped"] == 0.0 and m["micro_batches"] == 2 and torch.isfinite(torch.tensor(m["loss"]))
    after, version = learner.export_weights()
    assert version == 3 and all(v.device.type == "cpu" for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert learner.sft_step([(t.token_ids, t.loss_mask) for t in batch])["sft_loss"] > 0
    learner.save(tmp_path, extra={"step": 4})
    assert learner.load(tmp_path) == {"step": 4} and learner.version == 4


def test_checkpointed_step_matches_plain_step_on_gpu():
    """One bf16 ZeRO-2 step with activation checkpointing (the GPU default) and one without, from
    the same weights on the same batch: the same loss and the same update within bf16's bound
    (the recompute is the same arithmetic; only the order of gradient accumulation may differ)."""
    from kpop.config import AlgorithmConfig, LearnerConfig
    from kpop.policy.model import BailingMoeV2_5ForCausalLM
    from kpop.policy.presets import tiny_config
    from learner.learner import Learner

    torch.manual_seed(0)
    init = BailingMoeV2_5ForCausalLM(tiny_config()).state_dict()
    batch = groups(seed=1)
    runs = []
    for ckpt in (False, None):  # None: the default, on with a GPU
        model = BailingMoeV2_5ForCausalLM(tiny_config())
        model.load_state_dict(init)
        lcfg = LearnerConfig(lr=1e-4, zero_stage=2, dtype="bfloat16", num_gpus=1, micro_batch_tokens=256,
                             activation_checkpointing=ckpt)
        learner = Learner(lcfg, AlgorithmConfig(correction="none"), model)
        before, _ = learner.export_weights()
        m = learner.train_step(batch)
        after, _ = learner.export_weights()
        runs.append((learner.checkpointed_layers, m, {k: after[k].float() - before[k].float() for k in before}))
    (n0, m0, d0), (n1, m1, d1) = runs
    assert n0 == 0 and n1 == 9
    assert abs(m0["loss"] - m1["loss"]) <= 1e-3 * max(1.0, abs(m0["loss"]))
    num = sum(float((d0[k] - d1[k]).norm() ** 2) for k in d0) ** 0.5
    den = sum(float(d0[k].norm() ** 2) for k in d0) ** 0.5
    assert den > 0 and num / den < 0.05, num / den
