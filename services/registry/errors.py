"""What the registry refuses, as the runtime's domain error kinds: the HTTP edge answers each kind with
its status (services/runtime/http.py), the CLI prints the message, the audit log records both."""

from __future__ import annotations

from services.runtime import errors


class RegistryError(errors.DomainError):
    """A request the registry refuses."""


class NotFound(RegistryError, errors.NotFound):
    pass


class Conflict(RegistryError, errors.Conflict):
    pass


class Invalid(RegistryError, errors.Invalid):
    pass


class Forbidden(RegistryError, errors.Forbidden):
    """Who is asking may not do this (never audited: a refusal of the caller writes nothing)."""


class TooLarge(RegistryError, errors.TooLarge):
    pass
