"""`kpop train --ray-address` attaches to an existing Ray cluster: a head and a worker node
started with `ray start` on this machine, stopped again by the test.

Only processes that belong to this test's cluster are stopped: they are found by the test's own
unique Ray temp dir in their command line. A plain `ray stop` would take down every Ray cluster
on the machine, other users' included.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kpop.redis_server import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _ports(n: int) -> list[int]:
    return [free_port() for _ in range(n)]


def _node_args(taken: tuple[int, ...] = ()) -> list[str]:
    # every listening port explicit and free, so two clusters on one machine never collide; the
    # worker range must not cover any other port of the node (`taken`: the head's own), which Ray refuses
    mgr, obj, agent, agent_grpc, rt_env, metrics = ports = _ports(6)
    w0 = free_port()
    while any(w0 <= p <= w0 + 40 for p in (*ports, *taken)):
        w0 = free_port()
    return ["--num-cpus=1", "--disable-usage-stats", f"--node-manager-port={mgr}", f"--object-manager-port={obj}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}",
            f"--min-worker-port={w0}", f"--max-worker-port={w0 + 40}"]


def _our_pids(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:  # exited meanwhile
                pass
    return [p for p in pids if p != os.getpid()]


def _stop(marker: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _our_pids(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while _our_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """A cluster as `ray start --head` makes it by default: RAY_AUTH_MODE unset, and a token
    available (a user's ~/.ray/auth_token, left by any earlier local Ray; here a token file of
    this test's own, so the shared ~/.ray is left alone), so the cluster turns token auth on."""
    temp_dir = tempfile.mkdtemp(prefix="kcl-", dir="/tmp")  # short: Ray's unix socket paths are limited
    token_file = tmp_path_factory.mktemp("auth") / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    # PYTHONPATH: the actors import kpop
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS"):
        env.pop(key, None)
    port, client_port = free_port(), free_port()
    try:
        head = subprocess.run([RAY, "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}",
                               "--include-dashboard=false", f"--ray-client-server-port={client_port}",
                               *_node_args((port, client_port))], env=env, capture_output=True, text=True, timeout=120)
        assert head.returncode == 0, head.stdout + head.stderr
        assert "Token authentication is enabled" in head.stdout + head.stderr  # Ray's default with a token
        found = re.search(r"--address='([^']+)'", head.stdout + head.stderr)
        assert found, head.stdout
        address = found.group(1)
        # Ray itself needs RAY_AUTH_MODE=token to join a node at an explicit address (the
        # operator's step, not the kpop user's: the user's env below stays without it)
        worker = subprocess.run([RAY, "start", f"--address={address}", *_node_args((port, client_port))],
                                env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120)
        assert worker.returncode == 0, worker.stdout + worker.stderr
        yield address, env, temp_dir
    finally:
        _stop(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _train_cmd(run_dir: Path, address: str) -> list[str]:
    return [sys.executable, "-m", "kpop.cli.main", "train", str(ROOT / "configs/quickstart.yaml"),
            "name=cluster", f"run_dir={run_dir}", "learner.sft_steps=0", "schedule.eval_before_rl=false",
            "schedule.rl_steps=2", "schedule.batch_size=8", "rollout.group_size=4", "environments.eval_seeds=[10000]",
            "policy.preset=tiny", "schedule.eval_samples=0",
            "logging.tensorboard=false", "logging.progress=false", "algorithm.dynamic_filter=false",
            "--ray-address", address]


def _alive_nodes(address: str, env: dict) -> int:
    code = f"import ray; ray.init(address={address!r}); print(sum(n['Alive'] for n in ray.nodes()))"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


def test_kpop_train_attaches_to_a_two_node_cluster(two_node_cluster, tmp_path):
    """The user's command as written: an explicit address, the cluster's default authentication,
    nothing else set."""
    address, env, temp_dir = two_node_cluster
    assert _alive_nodes(address, env) == 2
    out = subprocess.run(_train_cmd(tmp_path, address), env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=480)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "cluster" / "summary.json").read_text())
    assert summary["rl_steps"] == 2 and summary["trajectories_consumed"] == 16
    assert "ray attached" in out.stderr + out.stdout
    assert not (tmp_path / "cluster" / "ray_logs").exists()  # it did not start a Ray of its own
    assert _alive_nodes(address, env) == 2  # and it left the cluster it attached to running


def test_a_refused_attach_says_what_to_set_and_leaves_no_run(two_node_cluster, tmp_path):
    address, env, _ = two_node_cluster
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    out = subprocess.run(_train_cmd(tmp_path, address), env={**env, "RAY_AUTH_TOKEN_PATH": str(wrong)},
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"kpop: could not attach to the Ray cluster at {address}" in out.stderr
    assert "RAY_AUTH_TOKEN" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "cluster").exists()  # no half-made run directory
