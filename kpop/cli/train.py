"""`kpop train CONFIG [KEY=VALUE ...]`: the main job."""

from __future__ import annotations

from pathlib import Path

import typer

from kpop.config import load_config


def train(
    config: Path = typer.Argument(..., help="YAML run config, e.g. configs/quickstart.yaml"),
    overrides: list[str] = typer.Argument(None, help="dotted overrides, e.g. learner.lr=2e-5"),
    ray_address: str = typer.Option(None, "--ray-address", help="attach to an existing Ray cluster"),
) -> None:
    """Run CONFIG: cold-start SFT, then asynchronous RL, into runs/<name>/."""
    cfg = load_config(config, overrides or [])
    if ray_address:
        cfg.ray.address = ray_address
    raise NotImplementedError("kpop train: the training loop is being written")
