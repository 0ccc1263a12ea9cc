"""Bucketed weight sync on CPU: every transport delivers bit-identical weights, versions move
forward, checksums catch corruption, buckets respect their size. Real processes: IpcSync maps
/dev/shm from a spawned consumer; BroadcastSync runs over a gloo group of 3 spawned ranks."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from kpop.weight_sync import (BroadcastSync, CopySync, InProcessSync, IpcSync, WeightHandle,
                              WeightSyncError, buckets as B, make_sync)


def make_state(version: int, extra: bool = False) -> dict[str, torch.Tensor]:
    """Mixed dtypes and shapes, values that differ per version (incl. a non-contiguous tensor)."""
    g = torch.Generator().manual_seed(1000 + version)
    s = {
        "embed.weight": torch.randn(40, 8, generator=g),
        "layers.0.norm.weight": torch.randn(8, generator=g).bfloat16(),
        "layers.0.proj.weight": torch.randn(8, 16, generator=g).t(),  # non-contiguous
        "layers.0.scale": torch.randn((), generator=g),
        "layers.0.experts": torch.randn(3, 5, 7, generator=g).bfloat16(),
        "step": torch.tensor([version, 7], dtype=torch.int64),
        "mask": torch.rand(11, generator=g) > 0.5,
        "empty": torch.zeros(0, 4),
        "lm_head.weight": torch.randn(33, 8, generator=g),
    }
    if extra:
        s["layers.1.new.weight"] = torch.randn(5, generator=g)
    return s


def assert_identical(got, want) -> None:
    assert list(got) == list(want) or set(got) == set(want)
    for k, w in want.items():
        t = got[k]
        assert t.dtype == w.dtype and t.shape == w.shape, k
        assert torch.equal(t.reshape(-1).view(torch.uint8), w.contiguous().reshape(-1).view(torch.uint8)), k


def test_buckets_respect_the_size_and_a_big_tensor_gets_its_own():
    state = make_state(1)
    layout = B.plan(state, bucket_bytes=256)
    placed = [t.name for b in layout for t in b.tensors]
    assert sorted(placed) == sorted(state)  # every tensor exactly once
    for b in layout:
        dts = {state[t.name].dtype for t in b.tensors}
        assert dts == {getattr(torch, b.dtype)}  # one dtype per bucket
        assert b.nbytes <= 256 or len(b.tensors) == 1
        off = 0
        for t in b.tensors:  # back to back
            assert t.offset == off
            off += t.numel
    big = [b for b in layout if b.tensors[0].name == "embed.weight"]  # 1280 bytes > 256
    assert len(big) == 1 and len(big[0].tensors) == 1
    assert len(B.plan(state, bucket_bytes=1 << 20)) == 4  # float32, bfloat16, int64, bool
    with pytest.raises(ValueError, match="positive"):
        B.plan(state, 0)


def test_copy_sync_is_bit_identical_zero_copy_and_versions_move_forward():
    sync = CopySync(bucket_bytes=256)
    for version in (1, 2):
        state = make_state(version)
        h = sync.publish(state, version)
        got = sync.receive(h)
        assert h.version == version and h.payload.version == version
        assert_identical(got, state)
        B.verify(h.payload, sync.buffers)  # the checksum matches the buckets
        # views into the buckets, not copies
        storages = {b.untyped_storage().data_ptr() for b in sync.buffers}
        assert all(v.untyped_storage().data_ptr() in storages for v in got.values())
    buffers = sync.buffers
    sync.publish(make_state(3), 3)
    assert all(a is b for a, b in zip(buffers, sync.buffers))  # same layout: buckets reused
    sync.publish(make_state(4, extra=True), 4)
    assert_identical(sync.receive(WeightHandle(4, sync._current)), make_state(4, extra=True))


def test_a_stale_handle_is_refused():
    sync = CopySync(bucket_bytes=256)
    old = sync.publish(make_state(1), 1)
    sync.publish(make_state(2), 2)
    with pytest.raises(WeightSyncError, match="version 1 is stale: its buckets now hold version 2"):
        sync.receive(old)
    with pytest.raises(WeightSyncError, match="handle says weights version 5, its manifest says 2"):
        sync.receive(WeightHandle(5, sync._current))


def test_a_corrupted_bucket_is_named_by_version_and_bucket():
    sync = CopySync(bucket_bytes=256)
    h = sync.publish(make_state(3), 3)
    sync.buffers[1][5] ^= 1  # one flipped bit
    with pytest.raises(WeightSyncError, match=r"weights version 3: bucket 1 \(float32.*fails its checksum"):
        sync.receive(h)
    sync.buffers[1][5] ^= 1
    h = sync.publish(make_state(3), 3)
    a, b = sync.buffers[0][:4].clone(), sync.buffers[0][4:8].clone()
    sync.buffers[0][:4], sync.buffers[0][4:8] = b, a  # two neighbouring words swapped: same plain sum
    with pytest.raises(WeightSyncError, match="bucket 0"):
        sync.receive(h)


def test_manifest_round_trips_through_json():
    sync = CopySync(bucket_bytes=256)
    m = sync.publish(make_state(2), 2).payload
    assert B.Manifest.from_json(m.to_json()) == m


# -- IpcSync: a consumer process maps the producer's /dev/shm buckets ------------------------------

def _ipc_consumer(handles, results) -> None:
    sync = IpcSync()
    while (h := handles.get()) is not None:
        try:
            state = sync.receive(h)
            assert_identical(state, make_state(h.version, extra=h.version >= 3))
            results.put((h.version, "ok"))
        except Exception as exc:  # reported to the test process, which asserts on it
            results.put((h.version, f"{type(exc).__name__}: {exc}"))


@pytest.mark.timeout(120)
def test_ipc_sync_on_cpu_shares_memory_with_another_process():
    ctx = mp.get_context("spawn")
    handles, results = ctx.Queue(), ctx.Queue()
    consumer = ctx.Process(target=_ipc_consumer, args=(handles, results))
    consumer.start()
    sync = IpcSync(bucket_bytes=256)
    try:
        for version in (1, 2):
            h = sync.publish(make_state(version), version)
            assert all(f.startswith("/dev/shm/") for f in h.payload.files)
            handles.put(h)
            assert results.get(timeout=60) == (version, "ok")
        files = h.payload.files
        h = sync.publish(make_state(3, extra=True), 3)  # new layout: new files, the old ones removed
        assert not any(os.path.exists(f) for f in files)
        handles.put(h)
        assert results.get(timeout=60) == (3, "ok")
        sync._buckets.buffers[0][0] ^= 0xFF  # corrupt the shared bucket after publishing
        handles.put(h)
        version, msg = results.get(timeout=60)
        assert "WeightSyncError: weights version 3: bucket 0" in msg and "fails its checksum" in msg
    finally:
        handles.put(None)
        consumer.join(timeout=60)
        files = list(sync._files)
        sync.close()
    assert consumer.exitcode == 0
    assert files and not any(os.path.exists(f) for f in files)


# -- BroadcastSync over gloo: rank 0 is the learner, ranks 1-2 the rollout engines -----------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _broadcast_rank(rank: int, world: int, port: int, queues) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # a bug fails the test instead of hanging it
    try:
        sync = BroadcastSync(src=0, device="cpu", bucket_bytes=256)
        if rank == 0:
            for version, extra in ((1, False), (2, False), (3, True), (4, True)):
                h = sync.publish(make_state(version, extra), version)
                for q in queues:
                    q.put(h)  # the controller's part: forward the handle
            sync.wait()
            return
        q = queues[rank - 1]
        # rank 0's next publish waits until this version reached every rank, as the controller would
        assert_identical(sync.receive(q.get()), make_state(1))
        h2 = q.get()
        assert_identical(sync.receive(h2), make_state(2))
        h3 = q.get()
        try:
            sync.receive(h2)  # a stale handle while rank 0 sends version 3 (a new layout)
        except WeightSyncError as exc:
            assert "mismatch (version): this rank was handed version 2" in str(exc) and "sent version 3" in str(exc)
        else:
            raise AssertionError("a mismatched manifest was accepted")
        del h3
        h4 = q.get()
        assert_identical(sync.receive(h4), make_state(4, extra=True))  # the group is still in step
        dist.barrier()
    finally:
        if rank == 0:
            dist.barrier()
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_broadcast_sync_over_gloo_to_two_rollout_ranks():
    ctx = mp.get_context("spawn")
    queues = [ctx.Queue(), ctx.Queue()]
    mp.spawn(_broadcast_rank, args=(3, _free_port(), queues), nprocs=3, join=True)


# -- the engine takes weights through the interface ------------------------------------------------

def test_embedded_engine_receives_weights_through_a_sync():
    from kpop.policy.checkpoint import build_model
    from kpop.policy.presets import tiny_config
    from kpop.rollout.embedded import EmbeddedEngine

    model = build_model(tiny_config(vocab_size=64), seed=0).eval()
    new = copy.deepcopy(model)
    with torch.no_grad():
        for w in new.parameters():
            w.add_(0.1)
    engine = EmbeddedEngine(model, max_seqs=2, block_size=4, num_blocks=16)
    try:
        sync = CopySync(bucket_bytes=4096)
        engine.weight_sync = sync
        engine.receive_weights(sync.publish(new.state_dict(), 1))
        assert engine.version == 1
        assert_identical(dict(model.state_dict()), dict(new.state_dict()))
        h = sync.publish(new.state_dict(), 2)
        sync.buffers[0][0] ^= 1
        with pytest.raises(WeightSyncError, match="version 2: bucket 0"):
            engine.receive_weights(h)
        assert engine.version == 1  # nothing loaded
    finally:
        engine.close()


def test_an_ipc_payload_cannot_point_the_consumer_at_other_files_or_functions(tmp_path):
    """`torch.from_file(shared=True)` creates and resizes the file it is given, and a CUDA payload
    names a function to call: a consumer only maps this transport's /dev/shm buckets and only calls
    torch's CUDA rebuild."""
    producer = IpcSync(bucket_bytes=256)
    h = producer.publish(make_state(1), 1)
    try:
        victim = tmp_path / "victim"
        victim.write_bytes(b"keep me")
        for path in (str(victim), "/dev/shm/../tmp/kpop-wsync-1-abc", "/dev/shm/other"):
            bad = WeightHandle(1, dataclasses.replace(h.payload, files=(path,) + h.payload.files[1:]))
            with pytest.raises(WeightSyncError, match="not a weight-sync bucket"):
                IpcSync().receive(bad)
        assert victim.read_bytes() == b"keep me"
        bad = WeightHandle(1, dataclasses.replace(h.payload, files=(), cuda=((os.remove, (str(victim),)),)))
        with pytest.raises(WeightSyncError, match="not a CUDA IPC handle"):
            IpcSync().receive(bad)
        assert victim.exists()
    finally:
        producer.close()


def test_a_weight_update_by_handle_evicts_partial_rollouts():
    """receive_weights keeps update_weights' semantics: a request in flight re-prefills under the new
    weights, each token tagged with the version that sampled it; a corrupted next version leaves the
    engine's weights bit-identical and its version unchanged, and the request still finishes. An
    older handle is refused unless it is a restored learner's rewind."""
    from kpop.policy.checkpoint import build_model
    from kpop.policy.presets import tiny_config
    from kpop.rollout.embedded import EmbeddedEngine
    from kpop.rollout.engine import GenerationRequest, SamplingParams

    model = build_model(tiny_config(vocab_size=64), seed=0).eval()
    model0 = {k: v.clone() for k, v in model.state_dict().items()}
    new = copy.deepcopy(model)
    with torch.no_grad():
        for w in new.parameters():
            w.add_(0.05)
    engine = EmbeddedEngine(model, max_seqs=2)
    engine.weight_sync = sync = CopySync(bucket_bytes=2048)
    fut = engine.submit(GenerationRequest(prompt_token_ids=[1, 2, 3, 4, 5], params=SamplingParams(
        temperature=0, max_tokens=300, ignore_eos=True)))
    try:
        deadline = time.time() + 30
        while engine.stats["decode_tokens"] < 3 and time.time() < deadline:
            time.sleep(0.01)
        engine.receive_weights(sync.publish(new.state_dict(), 1))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        bad = sync.publish({k: v + 1 for k, v in new.state_dict().items()}, 2)
        sync.buffers[-1][0] ^= 0x40  # one flipped bit
        with pytest.raises(WeightSyncError, match="version 2: bucket"):
            engine.receive_weights(bad)
        assert engine.version == 1
        assert_identical(dict(model.state_dict()), before)
        r = fut.result(timeout=120)
        k = r.token_versions.index(1)
        assert 0 < k and set(r.token_versions[:k]) == {0} and set(r.token_versions[k:]) == {1}
        assert engine.stats["reprefills"] == 1
        with pytest.raises(ValueError, match="must not go backwards"):  # a stale handle moves nothing
            engine.receive_weights(WeightHandle(0, None))
        # a learner restored from an older checkpoint rewinds the engines to its weights
        engine.receive_weights(dataclasses.replace(sync.publish(model0, 0), rewind=True))
        assert engine.version == 0
        assert_identical(dict(model.state_dict()), model0)
    finally:
        engine.close()


def test_in_process_handles_are_snapshots_and_transports_refuse_each_others_handles():
    state = make_state(1)
    h = InProcessSync().publish(state, 1)
    state["embed.weight"].add_(1.0)  # the learner steps on
    assert_identical(InProcessSync().receive(h), make_state(1))
    copy_sync = CopySync()
    copy_handle = copy_sync.publish(make_state(2), 2)
    with pytest.raises(WeightSyncError, match="carries a Manifest"):
        InProcessSync().receive(copy_handle)
    with pytest.raises(WeightSyncError, match="CopySync was handed a handle carrying a dict"):
        copy_sync.receive(h)
    with pytest.raises(WeightSyncError, match="IpcSync was handed a handle carrying a Manifest"):
        IpcSync().receive(copy_handle)
    with pytest.raises(ValueError, match="unknown weight-sync transport 'nccl'"):
        make_sync("nccl")


def test_an_ipc_handle_from_another_host_is_refused_by_name():
    producer = IpcSync(bucket_bytes=256)
    try:
        h = producer.publish(make_state(1), 1)
        assert_identical(IpcSync().receive(h), make_state(1))
        moved = WeightHandle(1, dataclasses.replace(h.payload, host="other-node"))
        with pytest.raises(WeightSyncError, match="published over IPC on host 'other-node'.*object_store"):
            IpcSync().receive(moved)
    finally:
        producer.close()
