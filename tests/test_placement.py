"""The colocated layout on a Ray cluster: fractional GPUs for the learner and the rollout actors,
resolved from the config, and the weight transport that goes with them. No GPU needed: Ray is
told the node has one, and places real actors by the resolved options."""
from __future__ import annotations

import shutil
import sys
import tempfile

import pytest

from actors.placement import check_gpus, learner_options, rollout_options, shares_gpu, weight_transport
from kpop.config import ConfigError, RunConfig, load_config

COLOCATED = {"learner": {"num_gpus": 0.5, "dtype": "bfloat16"}, "rollout": {"num_gpus": 0.5},
             "schedule": {"rl_steps": 0}}


def test_fractional_gpus_resolve_to_actor_options():
    cfg = RunConfig.model_validate(COLOCATED)
    assert learner_options(cfg) == {"num_cpus": 0, "num_gpus": 0.5, "max_restarts": 0}
    assert rollout_options(cfg) == {"num_cpus": 0, "num_gpus": 0.5}
    assert shares_gpu(cfg.learner.num_gpus) and shares_gpu(cfg.rollout.num_gpus)
    assert weight_transport(cfg) == "ipc"  # both ends on the GPU: CUDA IPC, no host copy
    cpu = RunConfig.model_validate({"schedule": {"rl_steps": 0}})
    assert learner_options(cpu)["num_gpus"] == 0 and rollout_options(cpu)["num_gpus"] == 0
    assert weight_transport(cpu) == "object_store" and not shares_gpu(0.0) and not shares_gpu(1.0)
    pinned = RunConfig.model_validate({**COLOCATED, "learner": {**COLOCATED["learner"], "weight_sync": "object_store"}})
    assert weight_transport(pinned) == "object_store"


def test_a_run_the_cluster_cannot_place_is_refused_by_numbers():
    cfg = RunConfig.model_validate(COLOCATED)  # learner 0.5 + (1 rollout + 1 eval) x 0.5
    check_gpus(cfg, 2.0)
    with pytest.raises(ValueError, match=r"asks for 1.5 GPUs .* the Ray cluster has 1"):
        check_gpus(cfg, 1.0)
    check_gpus(RunConfig.model_validate({**COLOCATED, "rollout": {"num_gpus": 0.25}}), 1.0)
    check_gpus(RunConfig.model_validate({"schedule": {"rl_steps": 0}}), 0.0)


def test_gpu_counts_are_shares_or_whole(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rollout: {num_gpus: 1.5}\nschedule: {rl_steps: 0}\n")
    with pytest.raises(ConfigError, match="rollout.num_gpus must be a share of one GPU .* got 1.5"):
        load_config(path)
    assert load_config(path, ["rollout.num_gpus=2", "learner.num_gpus=0.25"]).learner.num_gpus == 0.25


@pytest.mark.slow
def test_ray_puts_learner_and_rollout_on_the_same_gpu():
    import ray

    cfg = RunConfig.model_validate(COLOCATED)
    tmp = tempfile.mkdtemp(prefix="kray", dir="/tmp")  # AF_UNIX paths must stay < 108 bytes
    ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, _temp_dir=tmp, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ":".join(sys.path)}})
    try:
        @ray.remote
        class Probe:
            def gpus(self) -> list:
                return [str(g) for g in ray.get_gpu_ids()]

        learner = Probe.options(**learner_options(cfg)).remote()
        rollout = Probe.options(**rollout_options(cfg)).remote()
        assert ray.get(learner.gpus.remote()) == ray.get(rollout.gpus.remote()) == ["0"]
        assert ray.available_resources().get("GPU", 0.0) == 0.0  # the two halves fill the one GPU
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def test_the_engine_cache_is_sized_to_its_memory_share():
    """`rollout.gpu_memory_fraction` sizes the engine's cache on a shared GPU: what fits after the
    weights and recurrent states, at most what every episode at full length needs; too little
    memory is an error with the numbers."""
    from kpop.config import RolloutConfig
    from kpop.policy.checkpoint import build_model
    from kpop.policy.presets import tiny_config
    from kpop.rollout.worker import cache_blocks

    model = build_model(tiny_config(vocab_size=64), seed=0)
    r = RolloutConfig(max_concurrent_episodes=4, max_new_tokens=16, max_episode_tokens=63)
    assert cache_blocks(model, r, 1 << 30, 16) == 4 * 4  # roomy: 4 episodes x 4 pages of 16 tokens
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    tight = cache_blocks(model, r, weights + (4 << 20), 16)
    assert 4 <= tight <= 16
    with pytest.raises(ValueError, match=r"rollout.gpu_memory_fraction leaves the engine .* one 63-token episode needs 4"):
        cache_blocks(model, r, weights, 16)
