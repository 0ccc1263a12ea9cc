"""Evaluator commands: `kpop export`, `kpop replay`, `kpop eval`, `kpop view`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _fail(command: str, message: str, code: int = 2) -> None:
    typer.echo(f"kpop {command}: {message}", err=True)
    raise typer.Exit(code)


def _archive_filters(env: Optional[str], status: Optional[str]) -> dict:
    from kpop.archive import STATUSES

    if status is not None and status not in STATUSES:
        raise typer.BadParameter(f"--status must be one of {', '.join(STATUSES)}, got {status!r}")
    return {k: v for k, v in (("env_id", env), ("status", status)) if v is not None}


def export_cmd(
    run: Path = typer.Argument(..., help="run directory (or its trajectories/ archive)"),
    atif: Path = typer.Option(..., "--atif", help="output directory: one ATIF JSON file per trajectory"),
    env: Optional[str] = typer.Option(None, "--env", help="only this environment id"),
    status: Optional[str] = typer.Option(None, "--status", help="only consumed | dropped_stale | failed"),
) -> None:
    """Write the run's archived trajectories as ATIF (Agent Trajectory Interchange Format) JSON."""
    from kpop.archive import ArchiveError
    from kpop.atif import export_atif

    try:
        written = export_atif(run, atif, **_archive_filters(env, status))
    except ArchiveError as exc:
        _fail("export", str(exc))
    typer.echo(f"wrote {len(written)} ATIF trajectories to {atif}")


def replay_cmd(
    path: Path = typer.Argument(..., help="run directory or trajectory archive"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object (with match_rate)"),
    regrade_only: bool = typer.Option(False, "--regrade-only",
                                      help="only re-run the verifier on the rebuilt final state"),
    env: Optional[str] = typer.Option(None, "--env", help="only this environment id"),
    status: Optional[str] = typer.Option(None, "--status", help="only consumed | dropped_stale | failed"),
) -> None:
    """Re-execute recorded actions against fresh environments and re-grade. Exit 1 unless all match."""
    from kpop.archive import ArchiveError
    from kpop.replay import format_report, replay_path

    try:
        report = replay_path(path, regrade_only=regrade_only, **_archive_filters(env, status))
    except ArchiveError as exc:
        _fail("replay", str(exc))
    typer.echo(report.model_dump_json() if json_out else format_report(report))
    if report.matched != report.total:
        raise typer.Exit(1)


def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="policy checkpoint directory (HF: config.json + safetensors)"),
    env: str = typer.Option(..., "--env", help="environment id, e.g. kpop/tooluse-v0"),
    episodes: int = typer.Option(..., "--episodes", min=1, help="number of tasks (seeds --seed, --seed+1, ...)"),
    samples: int = typer.Option(1, "--samples", "-k", min=1, help="samples per task (pass@k up to this k)"),
    engine: Optional[str] = typer.Option(None, "--engine", help="embedded | vllm [default: the run's rollout.engine]"),
    json_out: bool = typer.Option(False, "--json", help="print the report as one JSON object"),
    out: Optional[Path] = typer.Option(None, "--out", help="write eval-<env>.json/.md into this directory"),
    kwarg: Optional[list[str]] = typer.Option(None, "--kwarg", help="env constructor NAME=VALUE (JSON), over the "
                                              "run's env kwargs; repeatable"),
    seed: int = typer.Option(10_000, help="first task seed"),
    temperature: Optional[float] = typer.Option(None, min=0.0, help="[default: the run's rollout.temperature]"),
    max_new_tokens: Optional[int] = typer.Option(None, min=1, help="per model turn [default: the run's]"),
    max_turns: Optional[int] = typer.Option(None, min=1, help="[default: the run's rollout.max_turns]"),
    max_episode_tokens: Optional[int] = typer.Option(None, min=1, help="[default: the run's]"),
    pass_threshold: float = typer.Option(1.0, help="an episode passes when reward >= this"),
    run_config: Optional[Path] = typer.Option(None, "--run-config", help="the run's config.yaml [default: found "
                                              "next to or above the checkpoint]"),
    no_run_config: bool = typer.Option(False, "--no-run-config", help="ignore the run's config: built-in defaults"),
) -> None:
    """Evaluate a checkpoint on an environment: mean reward and pass@k.

    A checkpoint of a run is evaluated with that run's env kwargs and rollout settings unless
    given here; the settings used are printed. Reports are written only with --out."""
    from kpop.cli.env import _parse_kwargs
    from kpop.evaluate import evaluate, format_markdown, format_settings, write_report

    if engine not in (None, "embedded", "vllm"):
        raise typer.BadParameter(f"--engine must be embedded or vllm, got {engine!r}")
    if run_config is not None and no_run_config:
        raise typer.BadParameter("--run-config and --no-run-config exclude each other")
    try:
        report = evaluate(checkpoint, env, episodes, samples=samples, engine=engine,  # type: ignore[arg-type]
                          env_kwargs=_parse_kwargs(kwarg or []), seed=seed, temperature=temperature,
                          max_new_tokens=max_new_tokens, max_turns=max_turns, max_episode_tokens=max_episode_tokens,
                          pass_threshold=pass_threshold, run_config=False if no_run_config else run_config)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        _fail("eval", str(exc))
    typer.echo(f"kpop eval: {format_settings(report)}", err=True)
    written = write_report(report, out) if out is not None else None
    typer.echo(report.model_dump_json() if json_out else format_markdown(report)
               + (f"\nreport: {written[0]}, {written[1]}" if written else "\nreport not written (--out DIR keeps it)"))


def view_cmd(
    run: Path = typer.Argument(..., help="run directory (its parent's other runs are listed too)"),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="port on 127.0.0.1 (0: any free port)"),
) -> None:
    """Serve a local web page over the run: trajectories, tokens, masks and metric plots."""
    from kpop.viewer.server import make_server

    try:
        server = make_server(run, port=port)
    except (FileNotFoundError, OSError) as exc:
        _fail("view", str(exc))
    host, bound = server.server_address[:2]
    typer.echo(f"kpop view: http://{host}:{bound}/  (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
