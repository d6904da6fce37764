"""`flywheel contracts export DIR`."""

import typer

app = typer.Typer(help="Event and HTTP contracts.", no_args_is_help=True)
