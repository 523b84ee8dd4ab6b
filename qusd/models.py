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
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from qusd import binfmt, interpreters, provision, verify
from qusd.binfmt import Entry, Rule, printable, raw
from qusd.catalog import ALL, Catalog, wants_all
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


# What the OpenAPI document promises: every request it calls valid, the
# daemon takes (or refuses only for the state of the machine: a missing
# interpreter, an existing entry, the caller's role). Where the checks below
# go further than JSON Schema can say (a name's bytes, a rule's total
# length), the document asks for a little less: printable ASCII, shorter
# fields; the checks themselves stay those of qusd.binfmt.

#: printable ASCII but the rule's delimiter ":", as a regex character class
_TEXT = r"\x20-\x39\x3b-\x7e"
#: and no "/" (the kernel makes a file of a name)
_NO_SLASH = r"\x20-\x2e\x30-\x39\x3b-\x7e"
#: and no "." (the kernel matches an extension after the last dot)
_NO_DOT = r"\x20-\x2d\x30-\x39\x3b-\x7e"
#: an absolute path of those characters, no component ".." (refused: the
#: kernel follows a symlink before "..", so such a path may lead elsewhere)
_COMPONENT = rf"(?:[{_NO_DOT}][{_NO_SLASH}]*|\.(?:[{_NO_DOT}][{_NO_SLASH}]*)?|\.\.[{_NO_SLASH}]+)"
_PATH = rf"^(?:/{_COMPONENT}?)+$"


def _whole(value: Any) -> Any:
    """A JSON number with no fraction (80.0) is the integer JSON Schema says
    it is; anything else goes to the strict int check as it came."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _no_dotdot(value: str) -> str:
    if ".." in value.split("/"):
        raise _invalid(
            "must not contain '..': the kernel follows a symlink before '..', so the path "
            "may lead elsewhere than it reads; give it without '..'"
        )
    return value


#: an integer, as JSON Schema's "integer" (80.0 included)
JsonInt = Annotated[int, BeforeValidator(_whole)]

Hex = Annotated[
    str,
    AfterValidator(_hex),
    Field(
        max_length=2 * binfmt.BINPRM_BUF_SIZE,
        description="hex, two digits per byte",
        json_schema_extra={"pattern": "^(?:[0-9a-fA-F]{2})+$", "maxLength": 256},
    ),
]
Flags = Annotated[
    str,
    Field(
        max_length=8,
        description="binfmt_misc flags: any of P, O, C, F",
        json_schema_extra={"pattern": "^[POCF]*$"},
    ),
    _field(binfmt.check_flags),
]
Name = Annotated[
    str,
    Field(
        min_length=1,
        max_length=255,
        json_schema_extra={
            "pattern": f"^[{_NO_SLASH}]+$",
            "not": {"enum": sorted(binfmt.RESERVED_NAMES)},
        },
    ),
    _field(binfmt.check_name),
]


class Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class EntrySpec(Request):
    """A custom rule: any magic or extension, any interpreter."""

    model_config = ConfigDict(
        json_schema_extra={
            # magic and mask, or an extension and neither (nor an offset)
            "anyOf": [
                {"properties": {"type": {"const": "magic"}, "magic": {"type": "string"},
                                "extension": {"type": "null"}},
                 "required": ["magic"]},
                {"properties": {"type": {"const": "extension"},
                                "extension": {"type": "string"}, "magic": {"type": "null"},
                                "mask": {"type": "null"}, "offset": {"const": 0}},
                 "required": ["type", "extension"]},
            ]
        }
    )  # fmt: skip

    name: Name
    type: Literal["magic", "extension"] = "magic"
    offset: JsonInt = Field(
        0, ge=0, lt=binfmt.BINPRM_BUF_SIZE, json_schema_extra={"maximum": 127}
    )  # with 128 bytes of magic at most, it always fits the 256 the kernel reads
    magic: Hex | None = None
    mask: Hex | None = Field(None, description="as long as magic")
    extension: (
        Annotated[
            str,
            Field(json_schema_extra={"pattern": f"^[{_NO_DOT}]+$", "maxLength": 128}),
            _field(binfmt.check_extension),
        ]
        | None
    ) = None  # fmt: skip
    interpreter: Annotated[
        str,
        Field(max_length=1024, json_schema_extra={"pattern": _PATH, "maxLength": 512}),
        _field(binfmt.check_interpreter),
        AfterValidator(_no_dotdot),
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

    model_config = ConfigDict(
        json_schema_extra={
            # either targets (and flags) or entry
            "anyOf": [
                {"properties": {"entry": {"type": "null"}}},
                {"properties": {"targets": {"type": "null"}, "flags": {"type": "null"}}},
            ]
        }
    )

    @field_validator("targets")
    @classmethod
    def _known(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        return _known_targets(value, info)

    @model_validator(mode="after")
    def _one_kind(self) -> RegisterRequest:
        if self.entry is not None and (self.targets is not None or self.flags is not None):
            raise _invalid("give either targets (and flags) or entry, not both")
        return self


def _known_targets(value: list[str] | None, info: ValidationInfo) -> list[str] | None:
    """Target names the catalog knows (its aliases too), printable; ["all"]
    (alone) is every foreign target: None, as if no targets were given."""
    if value is not None and ALL in value:
        try:
            wants_all(value)
        except QusdError as e:
            raise _invalid(e.reason) from None
        return None
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


TargetName = Annotated[str, Field(min_length=1, max_length=64)]


class VerifyRequest(Request):
    """Run targets' built-in programs through the kernel."""

    targets: list[TargetName] | None = Field(
        None,
        max_length=64,
        description="catalog targets or aliases; omitted: every target an entry in the table runs",
    )

    @field_validator("targets")
    @classmethod
    def _known(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        return _known_targets(value, info)


class InstallRequest(Request):
    """Extract interpreters from a qemu-user-static package (admins)."""

    targets: list[TargetName] = Field(min_length=1, max_length=64)
    deb: (
        Annotated[
            str, Field(min_length=2, max_length=4096, json_schema_extra={"pattern": "^/[^\\x00]+$"})
        ]
        | None
    ) = Field(
        None,
        description="a qemu-user-static .deb on the daemon's machine, as an absolute path qusd "
        "can read; omitted: Debian's, downloaded with apt-get into interpreter_cache",
    )

    @field_validator("targets")
    @classmethod
    def _known(cls, value: list[str], info: ValidationInfo) -> list[str]:
        _known_targets(value, info)  # checked; "all" (alone) stays, for the service
        return value

    @field_validator("deb")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("/") or "\0" in value):
            raise _invalid("must be an absolute path")
        return value


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


class ProvisionedOut(BaseModel):
    """An interpreter `interpreters install` extracted, and its origin."""

    path: str
    targets: list[str]
    package: str
    version: str = Field(description="the package's version")
    sha256: str = Field(description="of the interpreter file, as extracted")
    source: str = Field(description="the package file's name")
    installed: float = Field(description="when, in seconds since the epoch")

    @classmethod
    def of(cls, item: provision.Installed) -> ProvisionedOut:
        return cls.model_validate(item.to_json())


class TargetOut(BaseModel):
    name: str
    family: str
    native: bool = Field(description="the host runs it itself: not registered by default")
    native_by: Literal["probe", "family", "setting"] | None = Field(
        None,
        description="how native was decided: its built-in program run with no binfmt_misc "
        "entry (probe), the family table (family), native_targets/emulated_targets (setting)",
    )
    native_detail: str | None = Field(None, description="why, for people")
    offset: int
    magic: str
    mask: str
    interpreter: str | None
    static: bool | None = Field(description="statically linked (needed with F in containers)")
    provisioned: ProvisionedOut | None = Field(
        None, description="the interpreter was installed by `interpreters install`"
    )

    @classmethod
    def of(cls, info: TargetInfo) -> TargetOut:
        t, v = info.target, info.verdict
        return cls(
            name=t.name,
            family=t.family,
            native=info.native,
            native_by=v.how if v is not None else None,  # type: ignore[arg-type]
            native_detail=v.detail if v is not None else None,
            offset=t.offset,
            magic=t.magic.hex(),
            mask=t.mask.hex(),
            interpreter=info.interpreter.path if info.interpreter else None,
            static=info.interpreter.static if info.interpreter else None,
            provisioned=ProvisionedOut.of(info.provisioned) if info.provisioned else None,
        )


class VerifyResult(BaseModel):
    target: str
    ok: bool
    entry: str | None = Field(description="the entry the kernel handed the program to")
    reason: str | None = Field(description="why it failed, and the fix; or a note")
    interpreter: str | None
    flags: str | None
    static: bool | None
    qemu_version: str | None = Field(description="what `interpreter -version` says")
    native: bool = Field(description="it ran with no entry: the host runs it itself")
    stale: str | None = Field(description="the F interpreter file changed since registration")

    @classmethod
    def of(cls, check: verify.Check) -> VerifyResult:
        doc = check.to_json()
        for key in ("entry", "interpreter", "reason", "stale"):
            if doc[key] is not None:
                doc[key] = printable(doc[key])
        return cls.model_validate(doc)


class VerifyResponse(BaseModel):
    ok: bool = Field(description="every target verified ran")
    results: list[VerifyResult]


class InstallResponse(BaseModel):
    installed: list[ProvisionedOut]


class FixedOut(BaseModel):
    """The interpreter file an F entry was registered with (the kernel keeps it open)."""

    entry: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, name: str, fid: interpreters.FileId) -> FixedOut:
        return cls(entry=printable(name), **fid.to_json())


class InterpretersOut(BaseModel):
    store: str | None = Field(description="qusd's own interpreter directory, if any")
    provisioned: list[ProvisionedOut]
    fixed: list[FixedOut]


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
