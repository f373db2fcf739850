"""One hierarchy of errors. Every message says what went wrong, where, and what to do."""

from __future__ import annotations


class PermrankError(Exception):
    """Base of every error permrank raises on purpose."""


class ConfigError(PermrankError, ValueError):
    """An impossible setting (window size, step, template, flag)."""


class InputError(PermrankError, ValueError):
    """Bad input data; the message names the file, the line and the field."""

    def __init__(self, message: str, *, path: object = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = str(path) if path is not None else None
        self.line = line


class TemplateError(ConfigError):
    """A prompt template that cannot be used."""


class BackendError(PermrankError, RuntimeError):
    """The model endpoint failed in a way retries did not cure."""


class EndpointUnavailable(BackendError):
    """The endpoint cannot be reached or does not serve the model asked for."""
