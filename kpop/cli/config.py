"""`kpop config show CONFIG [KEY=VALUE ...]`: print the resolved run config."""

from __future__ import annotations

from pathlib import Path

import typer

from kpop.config import dump_config, load_config

app = typer.Typer(help="Inspect run configs.", no_args_is_help=True)


@app.command("show")
def show(
    config: Path = typer.Argument(..., help="YAML run config, e.g. configs/quickstart.yaml"),
    overrides: list[str] = typer.Argument(None, help="dotted overrides, e.g. learner.lr=2e-5"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of YAML"),
) -> None:
    """Load CONFIG, apply overrides, validate, and print the full resolved config."""
    cfg = load_config(config, overrides or [])
    typer.echo(cfg.model_dump_json(indent=2) if json_out else dump_config(cfg))
