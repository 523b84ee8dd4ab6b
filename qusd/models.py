"""The API contract: pydantic models for every request and response.

Requests are strict and refuse unknown fields; every field the kernel would
refuse is refused here first, by the same checks the rule builder uses. The
OpenAPI document is generated from these classes.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from qusd import binfmt
from qusd.binfmt import Entry, Rule, printable, raw
from qusd.catalog import Catalog
from qusd.errors import InvalidRuleError, QusdError
from qusd.service import Registration, TargetInfo

__all__ = ["printable"]  # models' users take it from here

_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")


def _invalid(reason: str) -> PydanticCustomError:
    """A validation error whose message is reason, as is."""
    return PydanticCustomError("invalid", "{reason}", {"reason": reason})


def _hex(value: str) -> str:
    if not _HEX.fullmatch(value):
        raise _invalid("must be hex digits, two per byte (e.g. 7f454c46)")
    return value.lower()


def _field(check: Any) -> Any:
    """Run a binfmt field check; its message becomes the validation error."""

    def validate(value: Any) -> Any:
        try:
            check(value)
        except InvalidRuleError as e:
            raise _invalid(e.reason) from None
        return value

    return AfterValidator(validate)


def _no_dotdot(value: str) -> str:
    if ".." in value.split("/"):
        raise _invalid(
            "must not contain '..': the kernel follows a symlink before '..', so the path "
            "may lead elsewhere than it reads; give it without '..'"
        )
    return value


Hex = Annotated[str, AfterValidator(_hex), Field(max_length=2 * binfmt.BINPRM_BUF_SIZE)]
Flags = Annotated[
    str,
    Field(max_length=8, description="binfmt_misc flags: any of P, O, C, F"),
    _field(binfmt.check_flags),
]
Name = Annotated[str, Field(min_length=1, max_length=255), _field(binfmt.check_name)]


class Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class EntrySpec(Request):
    """A custom rule: any magic or extension, any interpreter."""

    name: Name
    type: Literal["magic", "extension"] = "magic"
    offset: int = Field(0, ge=0, lt=binfmt.BINPRM_BUF_SIZE)
    magic: Hex | None = None
    mask: Hex | None = None
    extension: Annotated[str, _field(binfmt.check_extension)] | None = None
    interpreter: Annotated[
        str, Field(max_length=1024), _field(binfmt.check_interpreter), AfterValidator(_no_dotdot)
    ]
    flags: Flags = ""

    # Checks that need an earlier field run here, so the error names the field.

    @field_validator("offset")
    @classmethod
    def _offset(cls, value: int, info: ValidationInfo) -> int:
        if value and info.data.get("type") == "extension":
            raise _invalid("an extension rule has no offset")
        return value

    @field_validator("magic")
    @classmethod
    def _magic_fits(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            try:
                binfmt.check_magic(bytes.fromhex(value), None, info.data.get("offset", 0))
            except InvalidRuleError as e:
                raise _invalid(e.reason) from None
        return value

    @field_validator("mask")
    @classmethod
    def _mask_length(cls, value: str | None, info: ValidationInfo) -> str | None:
        magic = info.data.get("magic")
        if value is not None and magic is not None and len(value) != len(magic):
            raise _invalid(
                f"is {len(value) // 2} bytes, magic is {len(magic) // 2}: they must be equal"
            )
        return value

    @model_validator(mode="after")
    def _whole_rule(self) -> EntrySpec:
        if self.type == "magic" and (self.magic is None or self.extension is not None):
            raise _invalid("a magic rule needs magic (hex) and no extension")
        if self.type == "extension" and (
            self.extension is None or self.magic is not None or self.mask is not None
        ):
            raise _invalid("an extension rule needs extension and no magic or mask")
        try:
            self.rule().encode()
        except InvalidRuleError as e:
            raise _invalid(e.message) from None
        return self

    def rule(self) -> Rule:
        if self.type == "extension":
            return Rule(self.name, self.interpreter, extension=self.extension, flags=self.flags)
        return Rule(
            name=self.name,
            interpreter=self.interpreter,
            magic=bytes.fromhex(self.magic or ""),
            mask=bytes.fromhex(self.mask) if self.mask is not None else None,
            offset=self.offset,
            flags=self.flags,
        )


class RegisterRequest(Request):
    """Register catalog targets, or one custom entry."""

    targets: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        None,
        max_length=64,
        description="catalog targets or aliases (arm64, linux/arm/v7, ...); omitted: every "
        "target of another family than the host's that has an interpreter",
    )
    entry: EntrySpec | None = None
    flags: Flags | None = Field(None, description="for targets; default F")
    persistent: bool = Field(True, description="restore at every start")
    replace: bool = Field(False, description="overwrite an entry of the same name")
    force: bool = Field(
        False, description="admins: register even a rule that matches the host's own programs"
    )
    allow_untrusted_interpreter: bool = Field(
        False,
        description="admins: skip the check that the interpreter and its directories are "
        "owned by root and writable by nobody else",
    )

    @field_validator("targets")
    @classmethod
    def _known(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        catalog: Catalog | None = (info.context or {}).get("catalog")
        for name in value or []:
            if any(c.isspace() or not c.isprintable() for c in name):
                raise _invalid(f"target {name!r} has spaces or control characters")
        if value is not None and catalog is not None:
            for name in value:
                try:
                    catalog.get(name)
                except QusdError as e:
                    raise _invalid(e.message) from None
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> RegisterRequest:
        if self.entry is not None and (self.targets is not None or self.flags is not None):
            raise _invalid("give either targets (and flags) or entry, not both")
        return self


class EnableRequest(Request):
    enabled: bool


class ImportRequest(Request):
    """Custom rules read from binfmt.d files or update-binfmts entries (qusctl
    import parses them), registered all or none."""

    entries: list[EntrySpec] = Field(min_length=1, max_length=256)
    persistent: bool = Field(True, description="restore at every start")
    replace: bool = Field(False, description="overwrite entries of the same names")
    force: bool = Field(
        False, description="admins: register even rules that match the host's own programs"
    )
    allow_untrusted_interpreter: bool = Field(
        False, description="admins: skip the check that the interpreters are owned by root"
    )


class ResetRequest(Request):
    scope: Literal["managed", "qemu", "all"] = Field(
        "managed",
        description="managed: what qusd created; qemu: every qemu-* entry; all: the whole table",
    )


# -- responses ----------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class RawFields(BaseModel):
    """The exact bytes of text fields the kernel shows that are not UTF-8."""

    name: str | None = Field(None, description="hex of the name's bytes")
    interpreter: str | None = Field(None, description="hex of the interpreter path's bytes")
    extension: str | None = Field(None, description="hex of the extension's bytes")


class RegistrationOut(BaseModel):
    name: str
    enabled: bool
    type: Literal["magic", "extension"]
    offset: int
    magic: str | None = Field(description="hex")
    mask: str | None = Field(description="hex")
    extension: str | None
    interpreter: str
    flags: str
    managed: bool = Field(description="created by qusd")
    persistent: bool = Field(description="restored at every start")
    target: str | None = Field(description="the catalog target it runs, if any")
    interpreter_stale: bool = Field(
        False,
        description="an F entry whose interpreter file was replaced since (an upgrade): the "
        "kernel still runs the old file until the next reconcile registers it again",
    )
    owner: int | None = Field(
        description="the uid that registered it through qusd (users may change only their "
        "own entries); null when qusd did not register it"
    )
    kept: bool = Field(
        description="qusd keeps the name: an admin registered it, and qusd puts this "
        'definition back when another tool replaces it (drift = "restore")'
    )
    raw: RawFields | None = Field(
        description="Losslessly, the bytes of name, interpreter and extension when the kernel "
        "shows bytes that are not UTF-8 (another tool may register any): each such field is "
        "given here as hex of its exact bytes, while the field itself shows each byte that is "
        "not UTF-8 as the four characters \\xHH. null when every field is valid UTF-8: the "
        "fields are then exact."
    )

    @classmethod
    def of(cls, reg: Registration) -> RegistrationOut:
        e: Entry = reg.entry
        magic = e.type == "M"
        return cls(
            name=printable(e.name),
            enabled=e.enabled,
            type="magic" if magic else "extension",
            offset=e.offset,
            magic=e.magic.hex() if magic else None,
            mask=e.mask.hex() if e.mask is not None else None,
            extension=printable(e.extension) if e.extension is not None else None,
            interpreter=printable(e.interpreter),
            flags=e.flags,
            managed=reg.managed,
            persistent=reg.persistent,
            target=reg.target,
            interpreter_stale=reg.interpreter_stale,
            owner=reg.owner,
            kept=reg.kept,
            raw=_raw(e),
        )


def _raw(e: Entry) -> RawFields | None:
    texts = {"name": e.name, "interpreter": e.interpreter, "extension": e.extension}
    fields = {
        name: data.hex()
        for name, text in texts.items()
        if text is not None and (data := raw(text)) is not None
    }
    return RawFields(**fields) if fields else None


class RegisterResponse(BaseModel):
    registered: list[RegistrationOut]
    unchanged: list[RegistrationOut]


class ResetResponse(BaseModel):
    removed: list[str]


class ReconcileResponse(BaseModel):
    """What a reconcile changed."""

    restored: list[str] = Field(description="entries registered again or taken back")
    adopted: list[str]
    conflicts: list[str] = Field(description="names another definition holds, left alone")
    failed: list[str]
    dropped: list[str] = Field(description="non-persistent records of entries gone")
    updated: list[str] = Field(description="F entries registered again for a new interpreter")
    repaired: list[str] = Field(description="binfmt_misc mounted again, or enabled again")
    summary: str


class EventOut(BaseModel):
    """One line of GET /v1/events (newline-delimited JSON). Besides events,
    the stream carries `keep-alive` lines when idle and a `lost` line when
    events a client asked for (since) are no longer held."""

    seq: int = Field(
        description="monotonic within one run of the daemon; 0 on keep-alive and lost lines"
    )
    time: str = Field(description="UTC, RFC 3339")
    kind: str = Field(
        description="registered, unregistered, enabled, disabled, restored, drift, conflict, "
        "interpreter-updated, reconcile; keep-alive, lost"
    )
    message: str
    names: list[str]
    actor: int | Literal["qusd"] | None = Field(
        description="the uid that asked, or qusd for its own repairs"
    )
    lost: int | None = Field(None, description="on a lost line: how many events are gone")


class TargetOut(BaseModel):
    name: str
    family: str
    native: bool = Field(description="the host's own family: not registered by default")
    offset: int
    magic: str
    mask: str
    interpreter: str | None
    static: bool | None = Field(description="statically linked (needed with F in containers)")

    @classmethod
    def of(cls, info: TargetInfo) -> TargetOut:
        t = info.target
        return cls(
            name=t.name,
            family=t.family,
            native=info.native,
            offset=t.offset,
            magic=t.magic.hex(),
            mask=t.mask.hex(),
            interpreter=info.interpreter.path if info.interpreter else None,
            static=info.interpreter.static if info.interpreter else None,
        )


class BinfmtStatus(BaseModel):
    path: str
    mounted: bool
    enabled: bool | None


class SandboxInfo(BaseModel):
    pid: int


class Counts(BaseModel):
    entries: int
    managed: int
    persistent: int
    recorded: int


class StatusWarning(BaseModel):
    code: str
    message: str


class Status(BaseModel):
    version: str
    kernel: str
    machine: str
    family: str
    binfmt_misc: BinfmtStatus
    sandbox: SandboxInfo | None
    catalog: str
    state_file: str
    counts: Counts
    warnings: list[StatusWarning]


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str = Field(description="what went wrong and the fix, for people")
    code: str = Field(description="stable: what clients branch on")
    reason: str | None = Field(None, description="detail without the field it is about")
    field: str | None = Field(None, description="the request field at fault, if one is")
    errors: list[FieldError] | None = None
