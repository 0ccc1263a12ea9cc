"""One process, learners on two kinds of device: DeepSpeed fixes its accelerator at its first
import, so `import_deepspeed` must switch it (and the process group) to each learner's device.

Each case runs in a fresh interpreter: the accelerator and the process group are per process, and
the case must start from a known first import, whatever the tests before it did."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the repository first, then whatever the parent found its packages through (a --target install)
PYTHONPATH = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)

# a CPU or GPU learner on the tiny preset, one step; prints where its engine and weights live
LEARN = textwrap.dedent("""
    import torch
    from deepspeed.accelerator import get_accelerator
    from kpop.config import AlgorithmConfig, LearnerConfig
    from kpop.policy.model import BailingMoeV2_5ForCausalLM
    from kpop.policy.presets import tiny_config
    from kpop.trajectory import Trajectory
    from learner.learner import Learner

    def learn(gpu):
        g = torch.Generator().manual_seed(0)
        batch = []
        for j in range(4):
            ids = torch.randint(2, 1024, (24,), generator=g).tolist()
            mask = [0] * 8 + [1] * 16
            batch.append(Trajectory(run_id="acc", task_id="t", env_id="test", group_id="g", token_ids=ids,
                                    logprobs=[-6.9 * m for m in mask], loss_mask=mask, reward=float(j % 2)))
        cfg = LearnerConfig(lr=1e-3, zero_stage=2 if gpu else 1, dtype="bfloat16" if gpu else "float32",
                            num_gpus=1 if gpu else 0, micro_batch_tokens=256)
        learner = Learner(cfg, AlgorithmConfig(correction="none"), BailingMoeV2_5ForCausalLM(tiny_config()))
        m = learner.train_step(batch)
        params = {p.device.type for p in learner.engine.module.parameters()}
        print("LEARNED", learner.device.type, get_accelerator().device_name(), torch.distributed.get_backend(),
              sorted(params), m["skipped"], bool(torch.isfinite(torch.tensor(m["loss"]))), flush=True)
""")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=PYTHONPATH, **env)
    full.pop("DS_ACCELERATOR", None)  # the case sets it when it means to
    full.update(env)
    return subprocess.run([sys.executable, "-c", LEARN + textwrap.dedent(code)], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=600)


def _learned(run: subprocess.CompletedProcess) -> list[list[str]]:
    assert run.returncode == 0, run.stderr[-4000:]
    return [line.split()[1:] for line in run.stdout.splitlines() if line.startswith("LEARNED")]


@pytest.mark.slow
def test_cpu_learner_after_deepspeed_chose_cuda():
    """DeepSpeed imported with the CUDA accelerator (DS_ACCELERATOR=cuda, as a GPU learner or a GPU
    box's auto-detection leaves it) and then a CPU learner: it trains on the CPU over gloo.
    Before the fix its engine went to 'cuda' (no such device here, or the wrong one on a GPU box)."""
    run = _python("""
        import deepspeed
        assert get_accelerator().device_name() == "cuda", get_accelerator().device_name()
        learn(gpu=False)
    """, DS_ACCELERATOR="cuda")
    assert _learned(run) == [["cpu", "cpu", "gloo", "['cpu']", "0.0", "True"]]


@pytest.mark.slow
def test_a_single_process_group_that_cannot_carry_the_devices_collectives_is_re_created():
    """A CPU learner in a process whose own group is on a backend without CPU collectives: the group
    is re-created on gloo. The real case is a GPU learner's NCCL group, which a CPU-only box cannot
    build; torch's 'fake' test backend stands in for it (the GPU test below runs the real one)."""
    run = _python("""
        import torch.distributed as dist
        from torch.testing._internal.distributed.fake_pg import FakeStore
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
        learn(gpu=False)
        learn(gpu=False)  # a second learner keeps the group it found
    """, CUDA_VISIBLE_DEVICES="")
    assert _learned(run) == [["cpu", "cpu", "gloo", "['cpu']", "0.0", "True"]] * 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_multi_process_group_on_the_other_backend_is_an_error_that_changes_nothing():
    """Two ranks in a real gloo group, then a GPU learner's import: one rank cannot re-create a shared
    group, so it is a clear error naming both sides, raised before the accelerator is touched."""
    code = textwrap.dedent("""
        import torch
        torch.distributed.init_process_group("gloo")
        from deepspeed.accelerator import get_accelerator
        from learner.learner import import_deepspeed
        try:
            import_deepspeed(on_gpu=True)
        except RuntimeError as e:
            print("ERROR", e)
        print("AFTER", get_accelerator().device_name(), torch.distributed.get_backend())
        torch.distributed.barrier()
    """)
    port = str(_free_port())
    env = dict(os.environ, PYTHONPATH=PYTHONPATH, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2",
               DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        error = next(line for line in out.splitlines() if line.startswith("ERROR"))
        assert "cuda learner needs a nccl process group" in error and "gloo group of 2 processes" in error
        assert "AFTER cpu gloo" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_then_gpu_then_cpu_learner_in_one_process():
    """The order the whole test folder takes on a GPU box (and a user who tries a CPU learner
    first): CPU learner, GPU learner, CPU learner again, each on its own device and backend."""
    run = _python("""
        learn(gpu=False)
        learn(gpu=True)
        learn(gpu=False)
    """)
    assert _learned(run) == [["cpu", "cpu", "gloo", "['cpu']", "0.0", "True"],
                             ["cuda", "cuda", "nccl", "['cuda']", "0.0", "True"],
                             ["cpu", "cpu", "gloo", "['cpu']", "0.0", "True"]]
