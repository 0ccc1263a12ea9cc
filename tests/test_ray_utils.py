"""init_ray / shutdown_ray with a real local Ray (one CPU), and a second driver attaching to it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from kpop.config import RayConfig

ray = pytest.importorskip("ray")


@pytest.mark.slow
def test_local_ray_start_attach_and_clean_shutdown(tmp_path):
    from kpop.ray_utils import init_ray, shutdown_ray

    handle = init_ray(RayConfig(num_cpus=1), tmp_path / "run")
    try:
        assert handle.started_local and handle.dashboard_url is None
        assert len(handle.temp_dir) < 40
        # the run's Ray logs: a link to the live log directory while Ray is up
        assert handle.log_dir.parent == tmp_path / "run" / "ray_logs" and handle.log_dir.is_symlink()
        assert handle.log_dir.resolve().is_relative_to(Path(handle.temp_dir).resolve())
        assert ray.cluster_resources()["CPU"] == 1.0

        @ray.remote
        def schema_version() -> int:  # workers import the project like the driver does
            from kpop.trajectory import SCHEMA_VERSION

            return SCHEMA_VERSION

        from kpop.trajectory import SCHEMA_VERSION

        assert ray.get(schema_version.remote()) == SCHEMA_VERSION
        with pytest.raises(RuntimeError, match="already initialised"):
            init_ray(RayConfig())

        attach = (
            "import ray\nfrom kpop.config import RayConfig\nfrom kpop.ray_utils import init_ray, shutdown_ray\n"
            f"h = init_ray(RayConfig(), address={handle.address!r})\n"
            "print(h.started_local, ray.cluster_resources()['CPU'])\nshutdown_ray()\n"
        )
        out = subprocess.run([sys.executable, "-c", attach], capture_output=True, text=True, timeout=180,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        assert out.stdout.split()[-2:] == ["False", "1.0"], out.stderr[-2000:]
        ray_children = psutil.Process().children(recursive=True)
        assert ray_children
    finally:
        shutdown_ray()
    assert not os.path.exists(handle.temp_dir)
    # ... and a copy of it once the temp dir is gone, with the logs of the run's processes
    assert handle.log_dir.is_dir() and not handle.log_dir.is_symlink()
    assert list(handle.log_dir.glob("raylet*")) and list(handle.log_dir.glob("gcs_server*"))
    deadline = time.monotonic() + 15
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ray_children):
        assert time.monotonic() < deadline, [p.name() for p in ray_children if p.is_running()]
        time.sleep(0.2)
