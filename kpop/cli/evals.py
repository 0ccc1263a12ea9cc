"""Evaluator commands: `kpop export`, `kpop replay`, `kpop eval`, `kpop view`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kpop.trajectory import ArchiveStatus, TrajectoryStatus

STATUSES = tuple(ArchiveStatus)
EPISODE_STATUSES = tuple(TrajectoryStatus)


def _fail(command: str, message: str, code: int = 2) -> None:
    typer.echo(f"kpop {command}: {message}", err=True)
    raise typer.Exit(code)


def _archive_filters(env: Optional[str], status: Optional[str], episode_status: Optional[str] = None) -> dict:
    if status is not None and status not in STATUSES:
        raise typer.BadParameter(f"--status must be one of {', '.join(STATUSES)}, got {status!r}")
    if episode_status is not None and episode_status not in EPISODE_STATUSES:
        raise typer.BadParameter(f"--episode-status must be one of {', '.join(EPISODE_STATUSES)}, "
                                 f"got {episode_status!r}")
    filters = (("env_id", env), ("status", status), ("episode_status", episode_status))
    return {k: v for k, v in filters if v is not None}


# The help texts list the vocabularies from their one home, so they cannot fall behind the code.
_STATUS_HELP = "only trajectories archived as: " + " | ".join(STATUSES)
_EPISODE_STATUS_HELP = "only episodes that ended: " + " | ".join(EPISODE_STATUSES)


def export_cmd(
    run: Path = typer.Argument(..., help="run directory (or its trajectories/ archive)"),
    atif: Path = typer.Option(..., "--atif", help="output directory: one ATIF JSON file per trajectory"),
    env: Optional[str] = typer.Option(None, "--env", help="only this environment id"),
    status: Optional[str] = typer.Option(None, "--status", help=_STATUS_HELP),
    episode_status: Optional[str] = typer.Option(None, "--episode-status", help=_EPISODE_STATUS_HELP),
) -> None:
    """Write the run's archived trajectories as ATIF (Agent Trajectory Interchange Format) JSON."""
    from kpop.archive import ArchiveError
    from kpop.atif import export_atif

    try:
        written = export_atif(run, atif, **_archive_filters(env, status, episode_status))
    except ArchiveError as exc:
        _fail("export", str(exc))
    typer.echo(f"wrote {len(written)} ATIF trajectories to {atif}")


def replay_cmd(
    path: Path = typer.Argument(..., help="run directory or trajectory archive"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object (with match_rate)"),
    regrade_only: bool = typer.Option(False, "--regrade-only",
                                      help="only re-run the verifier on the rebuilt final state"),
    env: Optional[str] = typer.Option(None, "--env", help="only this environment id"),
    status: Optional[str] = typer.Option(None, "--status", help=_STATUS_HELP),
    episode_status: Optional[str] = typer.Option(None, "--episode-status", help=_EPISODE_STATUS_HELP),
    trust_archive: bool = typer.Option(
        False, "--trust-archive",
        help="use every archived env kwarg (sandbox image, limits, host paths ...) and the recorded docker "
             "image; only for archives you wrote yourself"),
    rescore: bool = typer.Option(
        False, "--rescore",
        help="run no environment: count the loss tokens each --kpop-phi / --icepop setting would mask, "
             "from the archived rollout and learner logprobs"),
    kpop_phi: Optional[list[float]] = typer.Option(None, "--kpop-phi", help="with --rescore: a KPop binary-KL "
                                                   "threshold; repeatable"),
    icepop: Optional[list[str]] = typer.Option(None, "--icepop", help="with --rescore: an IcePop window ALPHA,BETA "
                                               "(e.g. 0.5,2.0); repeatable"),
) -> None:
    """Re-execute recorded actions against fresh environments and re-grade. Exit 1 unless all match,
    2 if nothing matches the filters.

    The archive is untrusted input: archived env kwargs that would configure the sandbox or name a
    host path are not used (the report lists them) unless --trust-archive is given.

    --rescore instead re-applies the training-inference mask under other settings (exit 1 if a
    malformed row was skipped, 2 if no row has the learner's logprobs)."""
    from kpop.archive import ArchiveError
    from kpop.replay import format_report, replay_path

    filters = _archive_filters(env, status, episode_status)
    if rescore:
        if regrade_only or trust_archive:
            raise typer.BadParameter("--regrade-only and --trust-archive belong to a replay, not to --rescore")
        _rescore(path, json_out, kpop_phi or [], icepop or [], filters)
        return
    if kpop_phi or icepop:
        raise typer.BadParameter("--kpop-phi and --icepop are settings of --rescore")
    try:
        report = replay_path(path, regrade_only=regrade_only, trust_archive=trust_archive, **filters)
    except ArchiveError as exc:
        _fail("replay", str(exc))
    if report.total == 0:
        what = ", ".join(f"{k}={v}" for k, v in filters.items()) or "no filters"
        skipped = f"; {len(report.skipped_parts)} unreadable parts skipped" if report.skipped_parts else ""
        _fail("replay", f"no trajectories to replay in {path} ({what}{skipped})")
    typer.echo(report.model_dump_json() if json_out else format_report(report))
    if report.matched != report.total:
        raise typer.Exit(1)


def _rescore(path: Path, json_out: bool, phis: list[float], windows: list[str], filters: dict) -> None:
    from kpop.archive import ArchiveError
    from kpop.replay import format_rescore, parse_icepop, rescore_path

    if not phis and not windows:
        raise typer.BadParameter("--rescore needs at least one --kpop-phi PHI or --icepop ALPHA,BETA")
    try:
        parsed = [parse_icepop(w) for w in windows]
        report = rescore_path(path, phis, parsed, **filters)
    except (ArchiveError, ValueError) as exc:
        _fail("replay", str(exc))
    typer.echo(report.model_dump_json() if json_out else format_rescore(report))
    if report.trajectories == 0:
        what = ", ".join(f"{k}={v}" for k, v in filters.items()) or "no filters"
        _fail("replay", f"no trajectory in {path} ({what}) has the learner's logprobs to rescore")
    if report.skipped:
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
