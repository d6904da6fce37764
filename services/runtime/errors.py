"""Errors a user can act on. The CLI prints their message as one line and exits non-zero."""


class FlywheelError(Exception):
    """Base of every error whose message is meant for a person."""

    exit_code = 1


class ConfigurationError(FlywheelError):
    """A setting is missing or wrong (bad URL, unreachable broker ...)."""

    exit_code = 2


class InfrastructureError(FlywheelError):
    """A local service (Kafka, PostgreSQL) could not be fetched, started or stopped."""

    exit_code = 3
