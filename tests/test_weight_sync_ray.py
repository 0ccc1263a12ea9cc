"""Weights reach Ray rollout actors by handle through each Ray-run transport: the driver forwards a
small WeightHandle, every actor pulls the weights itself and holds them bit-identically (CPU:
IpcSync over /dev/shm, and the object store). Real Ray, real rollout workers, the tiny policy."""
from __future__ import annotations

import pickle
import shutil
import sys
import tempfile

import pytest
import torch

from kpop.config import PolicyConfig, RolloutConfig
from kpop.policy.checkpoint import load_policy
from kpop.weight_sync import WeightSyncError, make_sync

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session():
    import ray

    tmp = tempfile.mkdtemp(prefix="kray", dir="/tmp")  # AF_UNIX paths must stay < 108 bytes
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ":".join(sys.path)}})
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def _engine_state(worker) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in worker.engine.model.state_dict().items()}


@pytest.mark.parametrize("transport", ["ipc", "object_store"])
def test_actors_pull_published_weights_bit_identically(ray_session, transport):
    from actors.rollout_pool import RolloutPool

    ray = ray_session
    model, _ = load_policy(PolicyConfig(), seed=0)
    with torch.no_grad():
        new = {k: v + 0.01 * (i + 1) for i, (k, v) in enumerate(model.state_dict().items())
               if v.is_floating_point()}
    rollout = RolloutConfig(max_new_tokens=8, max_concurrent_episodes=2)
    pool = RolloutPool(2, dict(policy=PolicyConfig().model_dump(), rollout=rollout.model_dump(), stream=None,
                               run_id="ws", weight_sync=transport), max_inflight_per_worker=2)
    sync = make_sync(transport, bucket_bytes=1 << 16)
    try:
        handle = sync.publish(new, 3)
        assert len(pickle.dumps(handle)) < 64 << 10  # a reference and a manifest, not the weights
        pool.update_weights(handle)
        for w in pool.workers:
            assert ray.get(w.ping.remote())["version"] == 3
            got = ray.get(w.__ray_call__.remote(_engine_state))
            for name, want in new.items():
                assert torch.equal(got[name], want), name
        if transport == "ipc":  # a bucket overwritten under the handle: every actor refuses it, keeps v3
            handle = sync.publish(new, 4)
            sync.buffers[0][0] ^= 1
            with pytest.raises(WeightSyncError, match="version 4: bucket 0 .* fails its checksum"):
                pool.update_weights(handle)  # the actor's error, raised here by name
            assert [ray.get(w.ping.remote())["version"] for w in pool.workers] == [3, 3]
    finally:
        pool.shutdown()
        if transport == "ipc":
            sync.close()
