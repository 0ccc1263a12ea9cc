"""Start a local Ray for one run, or attach to a running cluster.

    handle = init_ray(cfg.ray, cfg.out_dir)     # cfg.ray.address None -> local, else attach
    ...
    shutdown_ray()

A local Ray's logs are kept in the run: `run_dir/ray_logs/<session>` links to the live log
directory while the run is up and becomes a copy of it at `shutdown_ray()` (the cluster's temp
dir, which holds them, is removed then).

Ray is imported inside the functions: everything below `actors/` must import without Ray.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kpop.config import RayConfig

log = logging.getLogger(__name__)

NAMESPACE = "kpop"
AUTH_HINT = ("if the cluster uses token authentication, set RAY_AUTH_TOKEN to what `ray get-auth-token` "
             "prints on its head node (or copy the head's ~/.ray/auth_token to this machine)")


class RayAttachError(RuntimeError):
    """Attaching to an existing Ray cluster failed; the message says what to check."""


@dataclass(frozen=True)
class RayHandle:
    address: str  # GCS address other drivers can attach to
    started_local: bool  # True: this process owns the cluster and shutdown_ray() ends it
    temp_dir: str | None  # the local cluster's session/socket directory
    dashboard_url: str | None
    log_dir: Path | None = None  # run_dir/ray_logs/<session> for a local cluster with a run dir


@dataclass
class _Owned:
    """What shutdown_ray() must clean up: the one piece of module state."""

    temp_dir: str
    log_link: Path | None


_owned: _Owned | None = None


def init_ray(
    cfg: RayConfig,
    run_dir: str | Path | None = None,
    *,
    address: str | None = None,
    runtime_env: dict[str, Any] | None = None,
) -> RayHandle:
    """Start or attach to Ray per `cfg` (`address` overrides `cfg.address`, e.g. from --ray-address).

    A local start uses `cfg.num_cpus` (None = all cores) and a short temp dir under /tmp,
    because Ray puts unix sockets there and socket paths are limited to 107 bytes. Nothing is
    written to `run_dir` unless Ray is up.
    """
    import ray

    global _owned
    address = address or cfg.address
    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in this process; call shutdown_ray() first")
    # local workers inherit the driver's environment (PYTHONPATH included); a remote cluster
    # needs KPop installed on its nodes, or a runtime_env that ships it
    common = dict(namespace=NAMESPACE, runtime_env=runtime_env, log_to_driver=True, configure_logging=False)
    if address:
        if cfg.num_cpus is not None:
            log.warning("ray.num_cpus=%s is ignored when attaching to a cluster at %s", cfg.num_cpus, address)
        ctx = _attach(address, common)
        temp_dir, log_dir = None, None
    else:
        temp_dir = tempfile.mkdtemp(prefix="kray-", dir="/tmp")
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
            raise
        log_dir = _link_logs(temp_dir, run_dir) if run_dir is not None else None
        _owned = _Owned(temp_dir, log_dir)
    gcs = ray.get_runtime_context().gcs_address
    dashboard = getattr(ctx, "dashboard_url", None) or None
    log.info("ray %s at %s (dashboard: %s)", "started" if not address else "attached", gcs, dashboard or "off")
    return RayHandle(address=gcs, started_local=not address, temp_dir=temp_dir, dashboard_url=dashboard,
                     log_dir=log_dir)


def _attach(address: str, common: dict[str, Any]) -> Any:
    import ray

    if "RAY_AUTH_MODE" not in os.environ:
        # Ray turns token auth on for a client only when it finds the cluster by itself
        # ("auto"); a cluster at an explicit address started with a token needs it just the same,
        # so apply Ray's own rule: token mode if a token is available here
        try:
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available,
            )
        except ImportError:  # a Ray without token auth
            pass
        else:
            # its "token auth is enabled for this cluster, set RAY_AUTH_MODE=disabled to opt
            # out" warning is meant for a cluster being started, not for a client: silenced
            ray_auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
            level = ray_auth_log.level
            ray_auth_log.setLevel(logging.ERROR)
            try:
                maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
            finally:
                ray_auth_log.setLevel(level)
    try:
        return ray.init(address=address, **common)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RayAttachError(f"could not attach to the Ray cluster at {address}: {first}\n{AUTH_HINT}") from None


def _link_logs(temp_dir: str, run_dir: str | Path) -> Path | None:
    session = Path(temp_dir, "session_latest").resolve()
    if not (session / "logs").is_dir():
        log.warning("no Ray log directory under %s: the run keeps no Ray logs", session)
        return None
    link = Path(run_dir) / "ray_logs" / session.name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(session / "logs", target_is_directory=True)
    return link


def shutdown_ray() -> None:
    """Disconnect; a cluster this process started is stopped, its logs copied into the run
    directory, and its temp dir removed."""
    import ray

    global _owned
    if ray.is_initialized():
        ray.shutdown()
    if _owned is None:
        return
    owned, _owned = _owned, None
    if owned.log_link is not None and owned.log_link.is_symlink():
        target = owned.log_link.resolve()
        owned.log_link.unlink()
        try:
            shutil.copytree(target, owned.log_link, ignore_dangling_symlinks=True)
        except (OSError, shutil.Error) as exc:  # partial logs beat none; the run itself is done
            log.warning("copying Ray's logs to %s: %s", owned.log_link, exc)
    shutil.rmtree(owned.temp_dir, ignore_errors=True)
