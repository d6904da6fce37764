"""`flywheel docs generate` and `flywheel docs check`: the reference pages in docs/reference/."""

from pathlib import Path

import typer

from services.runtime.errors import FlywheelError

app = typer.Typer(
    help="Reference pages generated from the code (settings, events, HTTP doors, CLI, ClickHouse).",
    no_args_is_help=True,
)


@app.command()
def generate(
    ctx: typer.Context,
    directory: Path = typer.Option(None, help="Where to write them; default: docs/reference/ of this checkout."),
) -> None:
    """Write every reference page from the code as it is now."""
    from services.cli.reference import REFERENCE_DIR, write

    # The command tree documented is the one running: the root of this command's context.
    written = write(ctx.find_root().command, directory or REFERENCE_DIR)
    typer.echo(f"wrote {len(written)} reference pages to {directory or REFERENCE_DIR}")


@app.command()
def check(
    ctx: typer.Context,
    directory: Path = typer.Option(None, help="The pages to check; default: docs/reference/ of this checkout."),
) -> None:
    """Exit 1 when a reference page differs from what the code generates now."""
    from services.cli.reference import REFERENCE_DIR, stale

    outdated = stale(ctx.find_root().command, directory or REFERENCE_DIR)
    if outdated:
        raise FlywheelError(
            f"stale reference pages: {', '.join(outdated)}; run `flywheel docs generate` and commit the result"
        )
    typer.echo("reference pages match the code")
