"""`kpop plan CONFIG [--json]`: parameter counts and memory needs, without allocating weights."""

from __future__ import annotations

from pathlib import Path

import typer


def plan(
    config: Path = typer.Argument(..., help="YAML run config (its policy section is planned)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Total/active parameters, cache sizes and the memory to train and serve CONFIG's policy."""
    raise NotImplementedError("kpop plan: being written (kpop/policy/plan.py)")
