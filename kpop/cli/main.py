"""`kpop` — the entry point. Each command group lives in its own module under kpop/cli/."""

from __future__ import annotations

import sys

import typer

from kpop.cli import config as config_cmd
from kpop.cli import env as env_cmd
from kpop.cli import evals as evals_cmd
from kpop.cli import plan as plan_cmd
from kpop.cli import sandbox as sandbox_cmd
from kpop.cli import train as train_cmd
from kpop.config import ConfigError
from kpop.ray_utils import RayAttachError

app = typer.Typer(
    name="kpop",
    help="KPop: asynchronous agentic RL for the Ring-2.6 policy.\n\n"
    "Start with `kpop train configs/quickstart.yaml`; `kpop COMMAND --help` explains each command.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(config_cmd.app, name="config")
app.add_typer(env_cmd.app, name="env")
app.add_typer(sandbox_cmd.app, name="sandbox")
app.command("plan")(plan_cmd.plan)
app.command("train")(train_cmd.train)
app.command("eval")(evals_cmd.eval_cmd)
app.command("replay")(evals_cmd.replay_cmd)
app.command("export")(evals_cmd.export_cmd)
app.command("view")(evals_cmd.view_cmd)


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        print(f"kpop: bad config:\n{exc}", file=sys.stderr)
        sys.exit(2)
    except RayAttachError as exc:  # a user's setup problem: the message says what to set, no traceback
        print(f"kpop: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
