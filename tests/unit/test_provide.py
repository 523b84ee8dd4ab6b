"""The fast layer of the compatibility doors: provide.plan (an entry that
already provides a target is reported, not fatal), qus-register's command
line and the image's dispatch. The same promises on the real kernel:
tests/test_qus.py, tests/test_tonistiigi.py, tests/test_action.py."""

from __future__ import annotations

import errno

import pytest

from qusd import catalog, entrypoint, provide, qus
from qusd.binfmt import Rule
from qusd.errors import ConflictError, InterpreterError, KernelError, QusdError
from qusd.provide import Result
from tests.unit.fake_kernel import FakeKernel

CAT = catalog.builtin()
AARCH64, S390X = CAT.get("aarch64"), CAT.get("s390x")
STATIC = "/usr/bin/qemu-{}-static"


def want(cpu: str, flags: str = "F") -> tuple[catalog.Target, Rule | QusdError]:
    t = CAT.get(cpu)
    return t, t.rule(STATIC.format(cpu), flags)


def test_plan_words() -> None:
    kernel = FakeKernel()
    kernel.register(AARCH64.rule(STATIC.format("aarch64"), "F"))  # identical
    kernel.register(S390X.rule(STATIC.format("s390x"), "POF"))  # serves s390x with F
    kernel.register(CAT.get("riscv64").rule(STATIC.format("riscv64"), "OCF"))  # C: in the way
    missing = InterpreterError("no interpreter for ppc64le")
    steps = provide.plan(
        kernel,
        [want("aarch64"), want("s390x"), want("riscv64"), want("arm"),
         (CAT.get("ppc64le"), missing)],
        "F",
    )  # fmt: skip
    assert [s.result for s in steps] == [
        Result.UNCHANGED, Result.PROVIDED, Result.CONFLICT, Result.REGISTERED,
        Result.NO_INTERPRETER,
    ]  # fmt: skip
    assert steps[1].shown() == ("qemu-s390x", "POF", STATIC.format("s390x"))
    assert steps[3].shown() == ("qemu-arm", "F", STATIC.format("arm"))
    assert steps[4].problem("fix") is missing
    problem = steps[2].problem("FIX")
    assert isinstance(problem, ConflictError) and problem.exit_status == 73
    assert problem.message.endswith("it has the C flag (set-uid binaries would run their "
                                    "interpreter as root); FIX")  # fmt: skip
    with pytest.raises(ConflictError):
        provide.refuse(steps, "FIX")


def test_provided_needs_no_interpreter_and_replace_keeps_it() -> None:
    """A target another entry (any name) serves needs no interpreter here,
    and is kept even when replacing is allowed."""
    kernel = FakeKernel()
    kernel.register(Rule("arm64-by-someone", STATIC.format("aarch64"), magic=AARCH64.magic,
                         mask=AARCH64.mask, flags="F"))  # fmt: skip
    (step,) = provide.plan(kernel, [(AARCH64, InterpreterError("none"))], "F", True)
    assert (step.result, step.entry and step.entry.name) == (Result.PROVIDED, "arm64-by-someone")
    (step,) = provide.plan(kernel, [want("aarch64", "OCF")], "OCF", True)
    assert step.result is Result.REGISTERED  # it lacks C, which was asked for


def test_apply_is_all_or_nothing() -> None:
    kernel = FakeKernel()
    kernel.register(S390X.rule(STATIC.format("s390x"), ""))  # lacks F: replaced
    before = kernel.entries()
    kernel.fail("register", errno.EINVAL, name="qemu-arm")
    steps = provide.plan(kernel, [want("s390x"), want("aarch64"), want("arm")], "F", True)
    assert [s.result for s in steps] == [Result.REPLACED, Result.REGISTERED, Result.REGISTERED]
    with pytest.raises(KernelError):
        provide.apply(kernel, steps)
    assert kernel.entries() == before
    kernel.failures.clear()
    done = provide.apply(kernel, steps)
    assert [s.entry and s.entry.flags for s in done] == ["F", "F", "F"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-s", "--", "-p", "aarch64"],
         {"static": True, "persistent": True, "targets": ["aarch64"]}),
        (["--", "-r"], {"clear": True, "targets": []}),
        (["-l"], {"steps": [("list", [])], "configure": False}),
        (["-l", "--", "-t"], {"steps": [("list", [])], "configure": True, "test": True}),
        (["-t", "aarch64,riscv64", "--", "--persistent", "yes", "--credential", "no"],
         {"targets": ["aarch64", "riscv64"], "persistent": True, "credential": False}),
        (["-sl", "--", "-pc", "-Q/q", "-F-static", "arm64"],
         {"static": True, "path": "/q", "suffix": "-static", "credential": True}),
        (["--", "--systemd", "ALL", "-e", "/x"], {"mode": "systemd", "exportdir": "/x",
                                                  "targets": []}),
        (["--", "--qemu-path=/a", "--qemu-suffix=-s", "-g", "no", "-d"],
         {"path": "/a", "suffix": "-s", "preserve_argv0": False, "mode": "debian"}),
        (["-i", "echo $1", "-s", "--", "x"], {"steps": [("shell", ["echo $1", "-s", "--", "x"])]}),
        (["-r", "-e"], {"steps": [("reset", []), ("exit", [])]}),
    ],
)  # fmt: skip
def test_qus_command_lines(argv: list[str], expected: dict[str, object]) -> None:
    req = qus.parse(argv, {})
    assert {k: getattr(req, k) for k in expected} == expected


def test_qus_environment_and_usage_errors() -> None:
    env = {"QEMU_TARGETS": "s390x ppc64le", "QEMU_PERSISTENT": "yes", "QEMU_TEST": "no"}
    req = qus.parse([], env)
    assert (req.targets, req.persistent, req.test) == (["s390x", "ppc64le"], True, False)
    for argv, message in [
        (["-x"], "invalid option: -x"),
        (["-t"], "option -t requires an argument: TARGETS"),
        (["--", "--nope"], "invalid option after --: --nope"),
        (["-il"], "-i takes the rest of the command line: split -il"),
    ]:
        with pytest.raises(qus.UsageError, match=message):
            qus.parse(argv, {})
    with pytest.raises(qus.UsageError, match="QEMU_CREDENTIAL='maybe': use yes or no"):
        qus.parse([], {"QEMU_CREDENTIAL": "maybe"})


@pytest.mark.parametrize(
    ("argv", "which", "args"),
    [
        (["register", "aarch64"], "qusd-binfmt", ["register", "aarch64"]),
        (["--json", "list"], "qusd-binfmt", ["--json", "list"]),
        (["--install=arm64"], "qusd-binfmt", ["--install=arm64"]),
        ([], "qusd-binfmt", []),
        (["-s", "--", "-p", "aarch64"], "qus-register", ["-s", "--", "-p", "aarch64"]),
        (["--help"], "qus-register", ["--help"]),
        (["--reset", "-p", "yes"], "qus-register",
         ["-r", "-s", "--", "-Q", "/usr/bin", "-p", "yes"]),
        (["-c", "yes", "-p", "yes"], "qus-register",
         ["-s", "--", "-Q", "/usr/bin", "-c", "yes", "-p", "yes"]),
    ],
)  # fmt: skip
def test_image_dispatch(argv: list[str], which: str, args: list[str]) -> None:
    assert entrypoint.command_line(argv) == (which, args)
