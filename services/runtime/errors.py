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


class DomainError(Exception):
    """A request a service refuses, said in the service's words: what is wrong (`message`), which input
    (`param`) and a stable `code` a client can branch on. It names no transport: the HTTP edge
    (services/runtime/http.py) maps each kind below to a status, the CLI prints the message."""

    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        if code:
            self.code = code


class BadRequest(DomainError):
    """A request that cannot be served as asked (an empty prompt, too many stop sequences)."""

    code = "invalid_request"


class Invalid(DomainError):
    """A value a rule refuses (a dataset line that does not parse, a template with a syntax error)."""

    code = "invalid_value"


class NotFound(DomainError):
    """What the request names does not exist."""

    code = "not_found"


class Conflict(DomainError):
    """The request contradicts the current state (an illegal stage move, a duplicate name)."""

    code = "conflict"


class Forbidden(DomainError):
    """Who is asking may not do this (a promotion without another principal's approval)."""

    code = "forbidden"


class TooLarge(DomainError):
    """The input is over a limit of the service."""

    code = "too_large"


class Unavailable(DomainError):
    """Something the service needs is down; the same request may succeed later."""

    code = "unavailable"
