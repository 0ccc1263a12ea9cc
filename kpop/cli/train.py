"""`kpop train CONFIG [KEY=VALUE ...]`: the main job."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import typer

from kpop.config import load_config


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def train(
    config: Path = typer.Argument(..., help="YAML run config, e.g. configs/quickstart.yaml"),
    overrides: list[str] = typer.Argument(None, help="dotted overrides, e.g. learner.lr=2e-5 schedule.mode=sync"),
    ray_address: str = typer.Option(
        None, "--ray-address",
        help="attach to an existing Ray cluster (host:port or 'auto'); a cluster with token authentication "
             "needs its token here, found as Ray finds it: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"),
    fresh: bool = typer.Option(False, "--fresh", help="ignore checkpoints in the run directory and start over"),
    colocate: bool = typer.Option(
        False, "--colocate",
        help="the whole loop in this process, without Ray: rollout engines and learner on one device (one GPU "
             "when rollout.num_gpus / learner.num_gpus > 0, each engine within rollout.gpu_memory_fraction of "
             "its memory; else CPU), weights copied on the device"),
) -> None:
    """Run CONFIG: cold-start SFT on oracle demonstrations, then asynchronous RL, into runs/<name>/.

    Re-running the same command resumes from the newest checkpoint. Metrics go to
    runs/<name>/metrics.jsonl and runs/<name>/tensorboard; the result to runs/<name>/summary.json.
    """
    cfg = load_config(config, overrides or [])
    if colocate and ray_address:
        typer.echo("kpop train: --colocate runs without Ray; it cannot attach to --ray-address", err=True)
        raise typer.Exit(2)
    if ray_address:
        cfg.ray.address = ray_address
    if fresh:
        cfg.resume = False
        from kpop.config import remove_run_dir

        try:
            remove_run_dir(cfg, announce=lambda path: typer.echo(f"--fresh: deleting {path}", err=True))
        except ValueError as exc:
            typer.echo(f"kpop train --fresh: {exc}", err=True)
            raise typer.Exit(2) from None
    logging.basicConfig(level=cfg.logging.level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # one BLAS thread per process: actors share few cores, and oversubscription is far slower
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C so Ray, Redis and the run dir close cleanly
    signal.signal(signal.SIGTERM, _interrupt)
    if colocate:
        from actors.colocate import train_colocated as run  # imported here: `kpop --help` stays fast
    else:
        from actors.controller import train as run

    summary = run(cfg)
    typer.echo(json.dumps(summary, indent=2))
