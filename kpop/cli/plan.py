"""`kpop plan CONFIG [--json]`: parameter counts and memory needs, without allocating weights."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def plan(
    config: Path = typer.Argument(..., help="YAML run config (its policy section is planned)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Total/active parameters, cache sizes and the memory to train and serve CONFIG's policy."""
    from kpop.config import ConfigError, load_config
    from kpop.policy.plan import format_plan, plan_run_config

    cfg = load_config(config)
    try:
        result = plan_run_config(cfg)
    except ValueError as exc:  # an arch that cannot build a model: report it as a config error
        raise ConfigError(f"{config}: {exc}") from None
    if json_out:
        typer.echo(json.dumps(result.model_dump(mode="json")))
    else:
        typer.echo(format_plan(result))
