"""`flywheel infra up|down|status` (owned by the infra work in progress)."""

import typer

app = typer.Typer(help="Start and stop local Apache Kafka (and PostgreSQL) without Docker.", no_args_is_help=True)
