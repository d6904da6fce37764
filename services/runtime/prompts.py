"""Prompt templates: the one sandboxed Jinja renderer the registry (render door) and serving (prompt_ref) share.

Templates are written by registry users but rendered with values from apps, so rendering runs in
Jinja's SandboxedEnvironment (no attribute walks to `__class__` and friends) with StrictUndefined
(a missing variable is an error, never an empty string in a production prompt). Autoescape is off:
the output is model input, not HTML.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError, meta
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

_environment = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


class PromptError(ValueError):
    """A template that cannot be parsed or rendered with the given values."""


class TemplateSyntax(PromptError):
    def __init__(self, lineno: int, message: str) -> None:
        super().__init__(f"line {lineno}: {message}")
        self.lineno = lineno
        self.message = message


class MissingVariable(PromptError):
    """Variables the template needs were not given (`missing`), or an undefined value was used."""

    def __init__(self, message: str, missing: list[str]) -> None:
        super().__init__(message)
        self.missing = missing


class UnsafeTemplate(PromptError):
    """The template tried something the sandbox forbids."""


def template_variables(template: str) -> list[str]:
    """The variables a template reads, sorted; TemplateSyntax when it does not parse."""
    try:
        return sorted(meta.find_undeclared_variables(_environment.parse(template)))
    except TemplateSyntaxError as error:
        raise TemplateSyntax(error.lineno, error.message or "syntax error") from None


def render_template(template: str, values: Mapping[str, Any], *, needs: Iterable[str] | None = None) -> str:
    """Render in the sandbox; every variable in `needs` (default: all the template reads) must be given."""
    wanted = template_variables(template) if needs is None else list(needs)
    missing = [name for name in wanted if name not in values]
    if missing:
        raise MissingVariable(f"missing variable(s) {', '.join(missing)}", missing)
    try:
        return _environment.from_string(template).render(**values)
    except UndefinedError as error:
        raise MissingVariable(error.message or "undefined value", []) from None
    except SecurityError as error:
        raise UnsafeTemplate(str(error)) from None


def lead_with_prompt(messages: Sequence[Mapping[str, str]], rendered: str) -> list[dict[str, str]]:
    """A chat as a prompt version shapes it, in serving (`prompt_ref`) and in the evaluator alike, so
    what is measured is what is served: the rendered prompt first, as the system message (as the user
    message of a chat that has none)."""
    return [{"role": "system" if messages else "user", "content": rendered}, *(dict(message) for message in messages)]
