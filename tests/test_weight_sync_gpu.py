"""Bucketed weight sync between GPUs: bit-identical weights, buckets on the GPU at both ends
(nothing through host memory), corruption caught (skipped without CUDA)."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.multiprocessing as mp

from kpop.weight_sync import BroadcastSync, CopySync, IpcSync, WeightSyncError, buckets as B
from test_weight_sync import _free_port, assert_identical, make_state

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def cuda_state(version: int, device: str = "cuda", extra: bool = False) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in make_state(version, extra).items()}


def on_host(state) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in state.items()}


def test_copy_sync_gpu_to_gpu_stays_on_the_gpu():
    sync = CopySync("cuda", bucket_bytes=256)
    for version in (1, 2):
        state = cuda_state(version)
        h = sync.publish(state, version)
        assert all(b.is_cuda for b in sync.buffers)
        got = sync.receive(h)
        assert all(v.is_cuda for v in got.values())
        assert_identical(on_host(got), make_state(version))
    sync.buffers[0][3] ^= 1
    with pytest.raises(WeightSyncError, match="weights version 2: bucket 0"):
        sync.receive(h)
    host = make_state(3)  # a CPU learner publishing to a GPU engine: one host-to-device copy per bucket
    got = sync.receive(sync.publish(host, 3))
    assert all(v.is_cuda for v in got.values())
    assert_identical(on_host(got), host)


def _ipc_consumer(handles, results) -> None:
    sync = IpcSync()
    while (h := handles.get()) is not None:
        try:
            got = sync.receive(h)
            assert all(v.is_cuda for v in got.values()), "an IPC view is not on the GPU"
            assert_identical(on_host(got), make_state(h.version))
            results.put((h.version, "ok"))
        except Exception as exc:  # reported to the test process, which asserts on it
            results.put((h.version, f"{type(exc).__name__}: {exc}"))


@pytest.mark.timeout(180)
def test_ipc_sync_cuda_handles_to_another_process():
    ctx = mp.get_context("spawn")
    handles, results = ctx.Queue(), ctx.Queue()
    consumer = ctx.Process(target=_ipc_consumer, args=(handles, results))
    consumer.start()
    sync = IpcSync("cuda", bucket_bytes=256)
    try:
        for version in (1, 2):
            h = sync.publish(cuda_state(version), version)
            assert h.payload.cuda and not h.payload.files and all(b.is_cuda for b in sync._buckets.buffers)
            handles.put(h)
            assert results.get(timeout=120) == (version, "ok")
        sync._buckets.buffers[1][0] ^= 0xFF
        torch.cuda.synchronize()
        handles.put(h)
        version, msg = results.get(timeout=120)
        assert "weights version 2: bucket 1" in msg and "fails its checksum" in msg
    finally:
        handles.put(None)
        consumer.join(timeout=60)
    assert consumer.exitcode == 0


def _nccl_rank(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    try:
        sync = BroadcastSync(src=0, device=f"cuda:{rank}", bucket_bytes=256)
        if rank == 0:
            for version in (1, 2):
                queue.put(sync.publish(cuda_state(version, "cuda:0"), version))
            sync.wait()
        else:
            for _ in (1, 2):
                h = queue.get()
                got = sync.receive(h)
                assert all(v.device == torch.device("cuda:1") for v in got.values())
                assert all(b.is_cuda for b in sync._recv_buffers)
                assert_identical(on_host(got), make_state(h.version))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_broadcast_sync_over_nccl_two_gpus():
    ctx = mp.get_context("spawn")
    mp.spawn(_nccl_rank, args=(_free_port(), ctx.Queue()), nprocs=2, join=True)


def test_manifest_checksums_agree_between_cpu_and_gpu():
    """The receiver may verify on another device than the sender sealed on."""
    state = make_state(1)
    layout = B.plan(state, 256)
    cpu, gpu = B.allocate(layout, "cpu"), B.allocate(layout, "cuda")
    B.pack(state, layout, cpu)
    B.pack(state, layout, gpu)
    assert B.checksums(cpu) == B.checksums(gpu)
