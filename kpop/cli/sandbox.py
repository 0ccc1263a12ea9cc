"""`kpop sandbox` commands."""

from __future__ import annotations

import json
import math
import sys

import typer

app = typer.Typer(help="Sandboxes (bubblewrap, docker): run a command under limits.", no_args_is_help=True)


@app.command("exec", context_settings={"allow_interspersed_args": False})
def exec_cmd(
    cmd: list[str] = typer.Argument(..., metavar="-- CMD ARGS...", help="The command (argv, no shell)."),
    backend: str = typer.Option("bwrap", help="bwrap | docker"),
    image: str = typer.Option(None, help="docker image (default kpop-sandbox:latest) or bwrap rootfs dir."),
    timeout: float = typer.Option(10.0, help="Wall-clock limit in seconds."),
    cpu_seconds: float = typer.Option(None, help="CPU-time limit of each process in seconds "
                                      "(default: the --timeout, so busy code may run as long as it allows)."),
    memory_mb: int = typer.Option(512, min=16, help="Memory limit of the whole sandbox."),
    network: bool = typer.Option(False, "--network", help="Give the sandbox the host's network."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with the result."),
) -> None:
    """Run CMD in a fresh sandbox; stdin is passed through when it is not a terminal.
    The exit code mirrors the command's (128+N if killed by signal N)."""
    from sandboxes import BACKENDS, Limits, SandboxError, create_sandbox
    from sandboxes.limits import MAX_SECONDS

    if backend not in BACKENDS:
        raise typer.BadParameter(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    cpu_seconds = timeout if cpu_seconds is None else cpu_seconds
    for flag, value in (("--timeout", timeout), ("--cpu-seconds", cpu_seconds)):
        if not (math.isfinite(value) and 0 < value <= MAX_SECONDS):
            raise typer.BadParameter(f"{flag} must be a finite number of seconds in (0, {MAX_SECONDS:g}], got {value}")
    stdin = None if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    limits = Limits(wall_time_s=timeout, cpu_time_s=cpu_seconds, memory_mb=memory_mb, network=network)
    try:
        with create_sandbox(backend, image=image, limits=limits) as sb:  # type: ignore[arg-type]
            result = sb.exec(cmd, stdin=stdin)
    except SandboxError as exc:
        typer.echo(f"kpop sandbox exec: {exc}", err=True)
        raise typer.Exit(125) from None  # like `docker run`: the sandbox itself failed
    if as_json:
        typer.echo(json.dumps(result.model_dump()))
    else:
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        if result.timed_out:
            sys.stderr.write(f"kpop sandbox exec: timed out after {timeout}s\n")
        if result.oom_killed:
            sys.stderr.write(f"kpop sandbox exec: killed for using more than {memory_mb} MB\n")
    raise typer.Exit(result.exit_code)
