"""Every failure qusd reports is a QusdError with a stable code.

The code is the contract: the API maps it to an HTTP status and a problem
type, the CLIs to an exit status, clients map a problem back to its class
(QusdError.from_problem). Every class takes the same arguments: the reason
(why, in words that name the fix), optionally the request field it is about,
and details that travel in the problem document. This module imports
nothing, so every layer can use it.
"""

from __future__ import annotations

from typing import Any, ClassVar


class QusdError(Exception):
    """Base of every error qusd raises on purpose (code "error": unclassified)."""

    code: ClassVar[str] = "error"
    http_status: ClassVar[int] = 500
    exit_status: ClassVar[int] = 1
    title: ClassVar[str] = "Error"

    def __init__(self, reason: str, *, field: str | None = None, **details: Any) -> None:
        self.reason = reason
        self.field = field
        self.details = details
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """What a person reads: the reason, after the field it is about."""
        return f"{self.field}: {self.reason}" if self.field else self.reason

    def problem(self) -> dict[str, Any]:
        """RFC 9457 problem details (the API's error body)."""
        doc: dict[str, Any] = {
            "type": f"urn:qusd:problem:{self.code}",
            "title": self.title,
            "status": self.http_status,
            "detail": self.message,
            "code": self.code,
            "reason": self.reason,
        }
        if self.field is not None:
            doc["field"] = self.field
        return doc

    @classmethod
    def from_problem(cls, doc: Any, status: int | None = None) -> QusdError:
        """The error a problem document stands for, as its own class (a
        client's view of the daemon's error)."""
        if not isinstance(doc, dict):
            return QusdError(f"qusd answered {status} with {doc!r}", status=status)
        kind = error_class(str(doc.get("code", "")))
        reason = doc.get("reason") or doc.get("detail") or f"qusd answered {status}"
        field = doc.get("field") if isinstance(doc.get("field"), str) else None
        err = kind(str(reason), field=field, status=status, problem=doc)
        return err


def error_class(code: str) -> type[QusdError]:
    """The error class for a stable code (a problem's `code`), or QusdError."""
    return _BY_CODE.get(code, QusdError)


# -- requests: refused before anything is touched ---------------------------------


class InvalidRuleError(QusdError):
    """A rule the kernel would refuse or misread; caught before any write."""

    code = "invalid-rule"
    http_status = 422
    exit_status = 65  # EX_DATAERR
    title = "Invalid rule"


class UnknownTargetError(QusdError):
    """A target name (or alias) the catalog does not know."""

    code = "unknown-target"
    http_status = 422
    exit_status = 65
    title = "Unknown target"


class RequestValidationError(QusdError):
    """A request failed validation (the API's 422 lists the failing fields)."""

    code = "validation"
    http_status = 422
    exit_status = 65
    title = "Invalid request"


class MalformedRequestError(QusdError):
    """A request the HTTP layer cannot read: bad JSON, bad encoding, bad framing."""

    code = "malformed-json"
    http_status = 400
    exit_status = 65
    title = "Malformed request"


class BadRequestError(QusdError):
    """A request HTTP itself refuses (a bad method token, Content-Length with
    Transfer-Encoding, a bad chunk, headers or a URL too long, not HTTP at
    all): found by the HTTP parser, before any route."""

    code = "bad-request"
    http_status = 400
    exit_status = 65
    title = "Bad request"


class UnsupportedMediaTypeError(QusdError):
    """A body that is not application/json, or comes with a Content-Encoding."""

    code = "unsupported-media-type"
    http_status = 415
    exit_status = 65
    title = "Unsupported media type"


class TooLargeError(QusdError):
    """A body over the daemon's limit."""

    code = "too-large"
    http_status = 413
    exit_status = 65
    title = "Request too large"


class MethodNotAllowedError(QusdError):
    """The path exists, the method does not (Allow names those that do): a
    client newer than the daemon."""

    code = "method-not-allowed"
    http_status = 405
    exit_status = 69  # EX_UNAVAILABLE
    title = "Method not allowed"


class RequestTimeoutError(QusdError):
    """The client did not send its request in time."""

    code = "timeout"
    http_status = 408
    exit_status = 75  # EX_TEMPFAIL
    title = "Request timeout"


class ClientGoneError(QusdError):
    """The client hung up before its request was read: nothing is answered
    (499 is what the audit and the log say, as nginx's "client closed
    request"); not a failure of the daemon."""

    code = "client-gone"
    http_status = 499
    exit_status = 75  # EX_TEMPFAIL
    title = "Client closed the request"


class RateLimitedError(QusdError):
    """Too many requests from one uid; retry after details["retry_after"] s."""

    code = "rate-limited"
    http_status = 429
    exit_status = 75  # EX_TEMPFAIL
    title = "Too many requests"

    @property
    def retry_after(self) -> int:
        return int(self.details.get("retry_after", 1))


# -- the table: what is there and what may be done with it -------------------------


class NoSuchEntryError(QusdError):
    """No binfmt_misc entry (or no file, or no API route) of that name."""

    code = "not-found"
    http_status = 404
    exit_status = 66  # EX_NOINPUT
    title = "Not found"


class EntryExistsError(QusdError):
    """The name is taken."""

    code = "entry-exists"
    http_status = 409
    exit_status = 73  # EX_CANTCREAT
    title = "Entry exists"


class ConflictError(EntryExistsError):
    """The name is taken by another definition; replacing it must be asked for."""

    code = "conflict"
    title = "Conflict"


class InterpreterError(QusdError):
    """The interpreter cannot be used: missing, not executable, not found."""

    code = "interpreter"
    http_status = 422
    exit_status = 72  # EX_OSFILE
    title = "Interpreter"


# -- who may do what --------------------------------------------------------------


class ForbiddenError(QusdError):
    """The caller's role does not allow this; the message names the rule."""

    code = "forbidden"
    http_status = 403
    exit_status = 77  # EX_NOPERM
    title = "Forbidden"


class UntrustedInterpreterError(QusdError):
    """An interpreter others could replace: it would run in their processes."""

    code = "untrusted-interpreter"
    http_status = 403
    exit_status = 77
    title = "Untrusted interpreter"


class HostTypeError(QusdError):
    """The rule would capture the host's own programs."""

    code = "host-type"
    http_status = 403
    exit_status = 77
    title = "Host type"


# -- the kernel and the machine ----------------------------------------------------


class NotMountedError(QusdError):
    """binfmt_misc is not mounted, or not in the kernel."""

    code = "not-mounted"
    http_status = 503
    exit_status = 69  # EX_UNAVAILABLE
    title = "Not mounted"


class KernelPermissionError(QusdError):
    """The kernel refused: no CAP_SYS_ADMIN over this binfmt_misc instance."""

    code = "permission-denied"
    http_status = 403
    exit_status = 77  # EX_NOPERM
    title = "Permission denied"


class KernelError(QusdError):
    """binfmt_misc refused a write for a reason we could not classify."""

    code = "kernel-error"
    http_status = 500
    exit_status = 71  # EX_OSERR
    title = "Kernel error"


class SandboxError(QusdError):
    """A sandbox (user + mount namespace) could not be made or entered."""

    code = "sandbox"
    http_status = 500
    exit_status = 71
    title = "Sandbox"


class InternalError(QusdError):
    """A bug in qusd: the daemon's log has the traceback."""

    code = "internal"
    http_status = 500
    exit_status = 70  # EX_SOFTWARE
    title = "Internal error"


# -- the daemon's own files and socket ---------------------------------------------


class StateError(QusdError):
    """The state file could not be written; the change was rolled back."""

    code = "state"
    http_status = 500
    exit_status = 74  # EX_IOERR
    title = "State"


class ConfigError(QusdError):
    """A setting is wrong; the message names it."""

    code = "config"
    http_status = 500
    exit_status = 78  # EX_CONFIG
    title = "Configuration"


class UnsafeStateError(QusdError):
    """The state directory or file could be changed by someone other than
    root (or the user running a rootless daemon), or state.json or
    state.journal is not a regular file: the daemon does not start (what it
    restores would be theirs to choose); the message names the fix."""

    code = "unsafe-state"
    http_status = 500
    exit_status = 78  # EX_CONFIG
    title = "Unsafe state directory"


class SocketInUseError(QusdError):
    """Another daemon serves on the socket or uses the state directory."""

    code = "socket-in-use"
    http_status = 500
    exit_status = 75  # EX_TEMPFAIL
    title = "Socket in use"


# -- clients ----------------------------------------------------------------------


class DaemonUnavailableError(QusdError):
    """The client could not reach the daemon."""

    code = "unavailable"
    http_status = 503
    exit_status = 69  # EX_UNAVAILABLE
    title = "Unavailable"


class SocketPermissionError(QusdError):
    """The client may not connect to the daemon's socket (not in its group)."""

    code = "socket-permission"
    http_status = 403
    exit_status = 77  # EX_NOPERM
    title = "Socket permission"


def _all(cls: type[QusdError]) -> list[type[QusdError]]:
    return [cls, *(k for sub in cls.__subclasses__() for k in _all(sub))]


_BY_CODE: dict[str, type[QusdError]] = {k.code: k for k in _all(QusdError)}
#: every code, with its HTTP and exit status: the table the README documents
CODES: dict[str, tuple[int, int]] = {c: (k.http_status, k.exit_status) for c, k in _BY_CODE.items()}
