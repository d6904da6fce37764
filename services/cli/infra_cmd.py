"""`flywheel infra up|down|status`: a local Apache Kafka (and PostgreSQL) without Docker, state under FLYWHEEL_HOME."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from infra.kafka_acls import ADMIN_PRINCIPAL, PRINCIPAL_NAMES
from infra.local_kafka import LocalKafka
from infra.local_postgres import LocalPostgres
from services.runtime.settings import FlywheelSettings

app = typer.Typer(help="Start and stop local Apache Kafka (and PostgreSQL) without Docker.", no_args_is_help=True)
console = Console(highlight=False, soft_wrap=True)  # long paths and URLs stay whole for copy and grep

Timeout = Annotated[float, typer.Option(help="Seconds to wait for each service to answer.")]


@app.command()
def up(
    postgres: Annotated[bool, typer.Option("--postgres", help="Also start PostgreSQL (for the registry).")] = False,
    port: Annotated[
        int | None, typer.Option(help="Kafka port; default 9092, or any free port when 9092 is taken.")
    ] = None,
    postgres_port: Annotated[
        int | None, typer.Option(help="PostgreSQL port; default 5432, or any free port when taken.")
    ] = None,
    secure: Annotated[
        bool,
        typer.Option(
            "--secure",
            help="SASL/SCRAM-SHA-512 and ACLs: one Kafka principal per service (infra/kafka_acls.py), passwords in a 0600 file under FLYWHEEL_HOME. A new home only: an existing plaintext one must be removed first.",
        ),
    ] = False,
    tls: Annotated[
        bool,
        typer.Option(
            "--tls",
            help="With --secure: SASL_SSL, with a CA and broker certificate made for this home (openssl); clients here trust it.",
        ),
    ] = False,
    timeout: Timeout = 60.0,
) -> None:
    """Start the local broker (reusing a running one) and record where it listens."""
    settings = FlywheelSettings()
    # Without --secure: a running broker is reused as it is, and a home made secure once stays secure.
    if tls and not secure:
        raise typer.BadParameter(
            "--tls needs --secure (TLS protects the SCRAM logins and ACL-guarded traffic of a secure broker)"
        )
    kafka = LocalKafka(
        settings.home,
        settings.cache,
        port,
        secure=True if secure else None,
        tls=True if tls else None,
        topic_prefix=settings.topic_prefix,
    )
    _start(kafka, timeout)
    if kafka.secure:
        console.print(
            f"  {kafka.protocol} (SCRAM-SHA-512) with ACLs; topics and ACLs created as {ADMIN_PRINCIPAL!r}. Principals: {', '.join(PRINCIPAL_NAMES)}\n"
            f"  their passwords are in {kafka.credentials_file} (owner only); processes here read theirs from it"
            + (f"\n  the CA clients trust (FLYWHEEL_KAFKA_SSL_CAFILE elsewhere): {kafka.cafile}" if kafka.tls else "")
        )
    if postgres:
        database = LocalPostgres(settings.home, postgres_port)
        _start(database, timeout)
        console.print(f"  its URL, password included, is in {database.state_file} (for FLYWHEEL_DATABASE_URL)")


@app.command()
def down(
    postgres: Annotated[bool, typer.Option("--postgres", "--all", help="Also stop PostgreSQL.")] = False,
    timeout: Timeout = 30.0,
) -> None:
    """Stop the local broker (and PostgreSQL) recorded under FLYWHEEL_HOME; data stays for the next `up`."""
    settings = FlywheelSettings()
    services = [LocalKafka(settings.home, settings.cache)]
    if postgres:
        services.append(LocalPostgres(settings.home))
    for service in services:
        before = service.status()
        stopped = service.stop(timeout)
        console.print(f"{before.name}: " + (f"stopped (pid {before.pid})" if stopped else "was not running"))


@app.command()
def status() -> None:
    """Show whether the local broker and PostgreSQL run, and where."""
    settings = FlywheelSettings()
    for service in (LocalKafka(settings.home, settings.cache), LocalPostgres(settings.home)):
        current = service.status()
        if current.running:
            mode = f" ({current.note})" if current.note else ""
            console.print(
                f"{current.name}: [green]running[/] pid {current.pid} at {current.address} since {current.started_at}{mode}"
            )
        else:
            console.print(f"{current.name}: [yellow]stopped[/]" + (f" ({current.note})" if current.note else ""))
        console.print(f"  data {current.data_dir}\n  log  {current.log_file}")


def _start(service: LocalKafka | LocalPostgres, timeout: float) -> None:
    was_running = service.status().running
    service.start(timeout)
    now = service.status()
    verb = "already running" if was_running else "started"
    console.print(f"{now.name}: {verb} at {now.address} (pid {now.pid}, log {now.log_file})")


@app.command()
def topics(
    replication_factor: Annotated[int, typer.Option(min=1, help="Replicas per partition (1 on a single broker).")] = 1,
) -> None:
    """Create every contract topic and its `.dlq` with explicit partitions (existing ones are kept)."""
    import asyncio

    from contracts.topics import all_topics
    from services.runtime.broker import ensure_topics
    from services.runtime.settings import load_settings

    settings = load_settings(FlywheelSettings)
    bootstrap = settings.resolved_kafka_bootstrap()
    # On a broker with ACLs only the admin may create topics: FLYWHEEL_KAFKA_SASL_* name it (docker-compose's
    # init step), or the local secure broker's credentials file does.
    security = settings.resolved_kafka_security(ADMIN_PRINCIPAL)
    created = asyncio.run(ensure_topics(bootstrap, settings.topic_prefix, replication_factor, security=security))
    wanted = all_topics(settings.topic_prefix)
    console.print(
        f"topics at {bootstrap}: {len(created)} created, {len(wanted) - len(created)} already there ({len(wanted)} in the contract)"
    )


@app.command()
def acls(
    show: Annotated[
        bool, typer.Option("--show", help="Print the principal/ACL table and the ACLs, change nothing.")
    ] = False,
) -> None:
    """Grant each principal exactly its rights (infra/kafka_acls.py), as the admin principal (FLYWHEEL_KAFKA_SASL_*)."""
    import asyncio

    from infra.kafka_acls import acl_bindings, apply_acls, table_markdown
    from services.runtime.broker import check_reachable
    from services.runtime.errors import ConfigurationError
    from services.runtime.settings import load_settings

    settings = load_settings(FlywheelSettings)
    if show:
        console.print(table_markdown())
        for binding in acl_bindings(settings.topic_prefix):
            console.print(f"  ALLOW {binding}")
        return
    bootstrap = settings.resolved_kafka_bootstrap()
    security = settings.resolved_kafka_security(ADMIN_PRINCIPAL)
    if not security.uses_sasl:
        raise ConfigurationError(
            "ACLs need an authenticated admin: set FLYWHEEL_KAFKA_SECURITY_PROTOCOL (SASL_SSL or SASL_PLAINTEXT), "
            "FLYWHEEL_KAFKA_SASL_USERNAME and FLYWHEEL_KAFKA_SASL_PASSWORD to a super user's, or start `flywheel infra up --secure`"
        )
    asyncio.run(check_reachable(bootstrap, security=security))
    count = asyncio.run(apply_acls(bootstrap, security, settings.topic_prefix))
    console.print(
        f"acls at {bootstrap}: {count} granted (or already there) to {', '.join(name for name in PRINCIPAL_NAMES if name != ADMIN_PRINCIPAL)}"
    )
