"""Every failure qusd reports is a QusdError with a stable code.

The code is the contract: the API maps it to an HTTP status and a problem
type, the CLI to an exit status. Messages name the cause and, where there is
one, the fix. This module imports nothing, so every layer can use it.
"""

from __future__ import annotations

from typing import Any, ClassVar


class QusdError(Exception):
    """Base of every error qusd raises on purpose."""

    code: ClassVar[str] = "error"
    http_status: ClassVar[int] = 500
    exit_status: ClassVar[int] = 1

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidRuleError(QusdError):
    """A rule the kernel would refuse or misread; caught before any write."""

    code = "invalid-rule"
    http_status = 422
    exit_status = 65  # EX_DATAERR

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", field=field)
        self.field = field


class UnknownTargetError(QusdError):
    code = "unknown-target"
    http_status = 422
    exit_status = 65


class EntryExistsError(QusdError):
    code = "entry-exists"
    http_status = 409
    exit_status = 73  # EX_CANTCREAT


class NoSuchEntryError(QusdError):
    code = "not-found"
    http_status = 404
    exit_status = 66  # EX_NOINPUT


class InterpreterError(QusdError):
    """The interpreter cannot be used: missing, not executable, not found."""

    code = "interpreter"
    http_status = 422
    exit_status = 72  # EX_OSFILE


class NotMountedError(QusdError):
    code = "not-mounted"
    http_status = 503
    exit_status = 69  # EX_UNAVAILABLE


class KernelPermissionError(QusdError):
    code = "permission-denied"
    http_status = 403
    exit_status = 77  # EX_NOPERM


class KernelError(QusdError):
    """binfmt_misc refused a write for a reason we could not classify."""

    code = "kernel-error"
    http_status = 500
    exit_status = 71  # EX_OSERR


class SandboxError(QusdError):
    """A sandbox (user + mount namespace) could not be made or entered."""

    code = "sandbox"
    http_status = 500
    exit_status = 71


class MalformedRequestError(QusdError):
    code = "malformed-json"
    http_status = 400
    exit_status = 65


class UnsupportedMediaTypeError(QusdError):
    code = "unsupported-media-type"
    http_status = 415
    exit_status = 65


class DaemonUnavailableError(QusdError):
    """The client could not reach the daemon."""

    code = "unavailable"
    http_status = 503
    exit_status = 69  # EX_UNAVAILABLE


def error_class(code: str) -> type[QusdError]:
    """The error class for a stable code (a problem's `code`), or QusdError."""
    todo: list[type[QusdError]] = [QusdError]
    while todo:
        cls = todo.pop()
        if cls.code == code:
            return cls
        todo.extend(cls.__subclasses__())
    return QusdError


class RequestValidationError(QusdError):
    """A request failed validation (the API's 422 with the failing fields)."""

    code = "validation"
    http_status = 422
    exit_status = 65


class ConflictError(EntryExistsError):
    """Same name, another definition."""

    code = "conflict"


class StateError(QusdError):
    """The state file could not be written; the change was rolled back."""

    code = "state"
    http_status = 500
    exit_status = 74  # EX_IOERR


class ConfigError(QusdError):
    code = "config"
    http_status = 500
    exit_status = 78  # EX_CONFIG


class SocketInUseError(QusdError):
    """Another daemon serves on the socket or uses the state directory."""

    code = "socket-in-use"
    http_status = 500
    exit_status = 75  # EX_TEMPFAIL


class ForbiddenError(QusdError):
    """The caller's role does not allow this; the message names the rule."""

    code = "forbidden"
    http_status = 403
    exit_status = 77  # EX_NOPERM


class UntrustedInterpreterError(QusdError):
    """An interpreter others could replace: it would run in their processes."""

    code = "untrusted-interpreter"
    http_status = 403
    exit_status = 77


class HostTypeError(QusdError):
    """The rule would capture the host's own programs."""

    code = "host-type"
    http_status = 403
    exit_status = 77


class RateLimitedError(QusdError):
    """Too many mutations from one uid; retry after retry_after seconds."""

    code = "rate-limited"
    http_status = 429
    exit_status = 75  # EX_TEMPFAIL

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, retry_after=retry_after)
        self.retry_after = retry_after


class RequestTimeoutError(QusdError):
    code = "timeout"
    http_status = 408
    exit_status = 75


class SocketPermissionError(QusdError):
    """The client may not connect to the daemon's socket (not in its group)."""

    code = "socket-permission"
    http_status = 403
    exit_status = 77  # EX_NOPERM
