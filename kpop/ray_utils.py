"""Start a local Ray for one run, or attach to a running cluster.

    handle = init_ray(cfg.ray, cfg.out_dir)     # cfg.ray.address None -> local, else attach
    ...
    shutdown_ray()

Ray is imported inside the functions: everything below `actors/` must import without Ray.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kpop.config import RayConfig

log = logging.getLogger(__name__)

NAMESPACE = "kpop"


@dataclass(frozen=True)
class RayHandle:
    address: str  # GCS address other drivers can attach to
    started_local: bool  # True: this process owns the cluster and shutdown_ray() ends it
    temp_dir: str | None  # the local cluster's session/socket directory
    dashboard_url: str | None


_owned_temp_dir: str | None = None  # removed by shutdown_ray(); the one piece of module state


def init_ray(
    cfg: RayConfig,
    run_dir: str | Path | None = None,
    *,
    address: str | None = None,
    runtime_env: dict[str, Any] | None = None,
) -> RayHandle:
    """Start or attach to Ray per `cfg` (`address` overrides `cfg.address`, e.g. from --ray-address).

    A local start uses `cfg.num_cpus` (None = all cores) and a short temp dir under /tmp,
    because Ray puts unix sockets there and socket paths are limited to 107 bytes; a
    pointer to it is written to `run_dir/ray_temp_dir` so logs can be found later.
    """
    import ray

    global _owned_temp_dir
    address = address or cfg.address
    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in this process; call shutdown_ray() first")
    # local workers inherit the driver's environment (PYTHONPATH included); a remote cluster
    # needs KPop installed on its nodes, or a runtime_env that ships it
    common = dict(namespace=NAMESPACE, runtime_env=runtime_env, log_to_driver=True, configure_logging=False)
    if address:
        if cfg.num_cpus is not None:
            log.warning("ray.num_cpus=%s is ignored when attaching to a cluster at %s", cfg.num_cpus, address)
        ctx = ray.init(address=address, **common)
        temp_dir = None
    else:
        temp_dir = tempfile.mkdtemp(prefix="kray-", dir="/tmp")
        _owned_temp_dir = temp_dir
        try:
            ctx = ray.init(
                num_cpus=cfg.num_cpus,
                include_dashboard=cfg.dashboard,
                dashboard_host="127.0.0.1",
                _temp_dir=temp_dir,
                **common,
            )
        except BaseException:
            shutil.rmtree(temp_dir, ignore_errors=True)
            _owned_temp_dir = None
            raise
        if run_dir is not None:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            (Path(run_dir) / "ray_temp_dir").write_text(temp_dir + "\n")
    gcs = ray.get_runtime_context().gcs_address
    dashboard = getattr(ctx, "dashboard_url", None) or None
    log.info("ray %s at %s (dashboard: %s)", "started" if not address else "attached", gcs, dashboard or "off")
    return RayHandle(address=gcs, started_local=not address, temp_dir=temp_dir, dashboard_url=dashboard)


def shutdown_ray() -> None:
    """Disconnect; a cluster this process started is stopped and its temp dir removed."""
    import ray

    global _owned_temp_dir
    if ray.is_initialized():
        ray.shutdown()
    if _owned_temp_dir is not None:
        shutil.rmtree(_owned_temp_dir, ignore_errors=True)
        _owned_temp_dir = None

