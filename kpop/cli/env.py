"""`kpop env` commands: list the registered environments and check one."""

from __future__ import annotations

import json
import textwrap
from typing import Any, Optional

import typer

app = typer.Typer(help="Environments: list them, check one.", no_args_is_help=True)


def _parse_kwargs(pairs: list[str]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.isidentifier():
            raise typer.BadParameter(f"--kwarg must look like NAME=VALUE, got {pair!r}")
        try:
            kwargs[key] = json.loads(raw)
        except json.JSONDecodeError:
            kwargs[key] = raw  # a bare string, e.g. backend=docker
    return kwargs


@app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json", help="Print a JSON list.")) -> None:
    """List environment ids: the built-ins and those of installed plugins (entry-point group kpop.environments)."""
    from environments import list_envs

    ids = list_envs()
    typer.echo(json.dumps(ids) if as_json else "\n".join(ids))


@app.command("check")
def check_cmd(
    env_id: str = typer.Argument(..., help="e.g. kpop/tooluse-v0"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with 'ok' and per-check results."),
    kwarg: Optional[list[str]] = typer.Option(
        None, "--kwarg", help="Env constructor argument NAME=VALUE (JSON value); repeatable."
    ),
    oracle: int = typer.Option(3, min=1, help="Oracle episodes (each must earn reward 1)."),
    random_episodes: int = typer.Option(3, "--random", min=0, help="Random-action episodes."),
    seed: int = typer.Option(0, help="First seed."),
) -> None:
    """Run Gymnasium's env checker, the oracle, random and malformed-action episodes, and the episode
    contract (rewards in [0, 1]; step() after the end raises). Exit 1 if any check fails."""
    from environments.check import check_env
    from environments.registry import is_registered, list_envs

    env_kwargs = _parse_kwargs(kwarg or [])
    if not is_registered(env_id):
        typer.echo(f"kpop env check: unknown environment {env_id!r}; known: {', '.join(list_envs())}", err=True)
        raise typer.Exit(2)
    report = check_env(env_id, env_kwargs=env_kwargs, n_oracle=oracle, n_random=random_episodes, seed=seed)
    if as_json:
        typer.echo(json.dumps(report, default=str))
    else:
        for c in report["checks"]:
            typer.echo(f"{'PASS' if c['ok'] else 'FAIL'}  {c['name']:<10} {c['duration_s']:7.2f}s")
            if not c["ok"]:  # the error in words, one problem per line; --json has the traceback too
                error = c["detail"].get("error", "") if isinstance(c["detail"], dict) else str(c["detail"])
                for problem in error.splitlines():
                    typer.echo(textwrap.fill(problem, width=100, initial_indent="      ", subsequent_indent="        "))
        typer.echo(f"{env_id}: {'ok' if report['ok'] else 'FAILED'}")
    raise typer.Exit(0 if report["ok"] else 1)
