"""The `flywheel` console script.

Each service owns its commands, in services/<name>/cli.py (`flywheel registry|train|eval|feedback ...`, and
its commands of `flywheel ops` and `flywheel bench`); they are mounted here, each cli.py found by name
(services/cli/service_commands.py). What is no service's lives beside this module: infra, contracts, docs,
doctor, up/run, and `bench all`; `flywheel demo` is the demo package's (services/demo). Heavy imports
(torch, Triton) happen inside the commands that need them, so `flywheel --help` is fast.
"""

from __future__ import annotations

import os
import sys

import typer

from services.cli import bench_cmd, contracts_cmd, docs_cmd, doctor_cmd, infra_cmd, run_cmd
from services.cli.service_commands import mount
from services.demo.command import demo
from services.runtime.errors import FlywheelError

app = typer.Typer(
    name="flywheel",
    help="Flywheel: adapt, evaluate, promote, serve, observe and retrain language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _configure(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show INFO logs (default: warnings and errors)."),
) -> None:
    from services.runtime.logging import configure_logging
    from services.runtime.settings import FlywheelSettings, load_settings

    settings = load_settings(FlywheelSettings)
    configure_logging(settings.model_copy(update={"log_level": "INFO" if verbose else "WARNING"}))


# Groups that several services add commands to: the monitor's views and `sql` and the sink's `replay`
# make `ops`; each service's benchmark and `all` make `bench`.
ops_app = typer.Typer(help="Ops consoles over ClickHouse.", no_args_is_help=True)

app.add_typer(infra_cmd.app, name="infra")
app.add_typer(ops_app, name="ops")
app.add_typer(contracts_cmd.app, name="contracts")
app.add_typer(docs_cmd.app, name="docs")
app.command(name="doctor")(doctor_cmd.doctor)
app.command(name="demo")(demo)
app.command(name="up")(run_cmd.up)
app.command(name="run")(run_cmd.run)
app.add_typer(bench_cmd.app, name="bench")
mount(app, shared={"ops": ops_app, "bench": bench_cmd.app})


def main() -> None:
    """Entry point: user-facing errors become one line on stderr and a non-zero exit, never a traceback."""
    try:
        # Without standalone mode click returns typer.Exit's code instead of exiting with it.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except FlywheelError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    # typer 0.29 carries its own copy of click: its usage errors derive from typer.TyperException, not
    # from the click package's ClickException.
    except typer.TyperException as error:  # usage errors: the one-line message with the usage hint
        show = getattr(error, "show", None)
        if show is not None:
            show()
        else:
            typer.echo(f"error: {error.format_message()}", err=True)
        sys.exit(error.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except Exception as error:  # noqa: BLE001 - last line of defence: no traceback reaches a user
        if os.environ.get("FLYWHEEL_DEBUG"):
            raise
        typer.echo(
            f"error: unexpected {type(error).__name__}: {error} (set FLYWHEEL_DEBUG=1 for the traceback)", err=True
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
