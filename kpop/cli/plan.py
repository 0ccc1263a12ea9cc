"""`kpop plan CONFIG [--json]`: parameter counts and memory needs, without allocating weights."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def plan(
    config: Path = typer.Argument(..., help="YAML run config (its policy section is planned)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    nccl_gb_per_s: float = typer.Option(
        None, "--nccl-gbps", help="also estimate one weight sync: NCCL broadcast bus bandwidth, GB/s"),
    copy_gb_per_s: float = typer.Option(
        3000.0, "--copy-gbps", help="same-node device copy rate for packing/unpacking buckets, GB/s "
        "(default: ~70% of an H200's 4.25 TB/s copy bandwidth measured by bench/kernels.py)"),
    bucket_mb: float = typer.Option(256.0, "--bucket-mb", help="weight-sync bucket size, MiB"),
) -> None:
    """Total/active parameters, cache sizes and the memory to train and serve CONFIG's policy (with --nccl-gbps, also the time of one weight sync)."""
    from kpop.config import ConfigError, load_config
    from kpop.policy.plan import format_plan, format_sync, plan_run_config, plan_weight_sync

    cfg = load_config(config)
    try:
        result = plan_run_config(cfg)
    except ValueError as exc:  # an arch that cannot build a model: report it as a config error
        raise ConfigError(f"{config}: {exc}") from None
    sync = None
    if nccl_gb_per_s is not None:
        try:
            sync = plan_weight_sync(result, int(bucket_mb * (1 << 20)), copy_gb_per_s, nccl_gb_per_s)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    if json_out:
        out = result.model_dump(mode="json")
        if sync is not None:
            out["weight_sync"] = sync.model_dump(mode="json")
        typer.echo(json.dumps(out))
    else:
        typer.echo(format_plan(result) + ("\n" + format_sync(sync) if sync else ""))
