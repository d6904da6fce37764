"""`flywheel contracts export DIR` and `flywheel contracts check`."""

from pathlib import Path

import typer

from services.runtime.errors import FlywheelError

app = typer.Typer(help="Event and HTTP contracts: JSON Schemas and the compatibility check.", no_args_is_help=True)


@app.command()
def export(directory: Path = typer.Argument(..., help="Where to write the JSON Schemas (events/, http/).")) -> None:
    """Write the JSON Schema of every event (in its envelope) and every shared HTTP model."""
    from contracts.schema_snapshot import write_schemas

    written = write_schemas(directory)
    typer.echo(f"wrote {len(written)} schemas to {directory}")


@app.command()
def check(
    snapshot: Path = typer.Option(None, help="Published snapshot directory; default: the one shipped in contracts/."),
) -> None:
    """Compare the contracts with the published snapshot; exit 1 on a breaking change."""
    from contracts.schema_snapshot import REGENERATE_HINT, SNAPSHOT_DIR, compatibility_report

    breaking, other = compatibility_report(snapshot or SNAPSHOT_DIR)
    for line in other:
        typer.echo(f"changed: {line}")
    if breaking:
        for line in breaking:
            typer.echo(f"BREAKING: {line}", err=True)
        raise FlywheelError(f"{len(breaking)} breaking change(s): add a new schema_version for the event instead")
    typer.echo("compatible" + (f"; {REGENERATE_HINT}" if other else " and identical to the snapshot"))
