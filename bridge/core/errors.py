"""Domain errors. Each adapter maps these to its dialect in one table."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base class; `str(err)` is a sentence safe to show the caller."""


class Invalid(DomainError):
    pass


class Unauthorized(DomainError):
    pass


class Revoked(Unauthorized):
    """The device identity behind a request was deleted, disabled or re-issued meanwhile: nothing
    of what it sent is stored, and its connection is to be closed."""


class Forbidden(DomainError):
    pass


class NotFound(DomainError):
    pass


class Conflict(DomainError):
    pass


class TooLarge(DomainError):
    pass


class QuotaExceeded(Forbidden):
    def __init__(self, message: str, policy: Any) -> None:
        super().__init__(message)
        self.policy = policy


class TooManyRequests(DomainError):
    """Refused before any work was done (too many failed logins, or too many checks in progress);
    `retry_after` is how long to wait, in seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
