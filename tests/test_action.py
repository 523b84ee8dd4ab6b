"""The GitHub Action on a simulated runner.

Each test executes exactly what action.yml's step executes, read from the
file: its `run:` text as the runner does (`bash --noprofile --norc -eo
pipefail FILE`), its `env:` with `${{ inputs.* }}` evaluated from the
inputs' defaults and the `with:` of the test, the environment a runner sets
(GITHUB_OUTPUT, GITHUB_ACTION_PATH, ...), and the outputs read back from
GITHUB_OUTPUT through action.yml's `outputs:`. The runner is a sandbox (its
own binfmt_misc table): as GitHub's `runner` user through sudo, as root, with
the distribution's rules already loaded by the real systemd-binfmt or on an
empty table; or a container job (root, no sudo) in a container that joined a
sandbox, where the Action installs qemu-user-static with apt for real.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from qusd import catalog
from tests import containers
from tests.conftest import ROOT, Sandbox, busybox_path

EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
NATIVE_PLATFORMS = {"x86_64": ["linux/amd64", "linux/386"]}
SYSTEMD_BINFMT = "/usr/lib/systemd/systemd-binfmt"
IN_CONTAINER = "/__w"  # where GitHub mounts the runner's work tree in a container job


def evaluate(text: str, context: Mapping[str, str]) -> str:
    """The runner's `${{ ... }}` substitution, for the expressions the
    Action uses (anything else is a test failure, not a guess)."""

    def one(m: re.Match[str]) -> str:
        if m.group(1) not in context:
            raise AssertionError(f"the simulated runner cannot evaluate {m.group(0)}")
        return context[m.group(1)]

    return EXPRESSION.sub(one, text)


def read_outputs(text: str) -> dict[str, str]:
    """$GITHUB_OUTPUT as the runner reads it: NAME=VALUE or NAME<<DELIM."""
    lines, found, i = text.split("\n"), {}, 0
    while i < len(lines):
        line, i = lines[i], i + 1
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delimiter = line.split("<<", 1)
            end = lines.index(delimiter, i)
            found[name], i = "\n".join(lines[i:end]), end + 1
        elif line:
            name, _, value = line.partition("=")
            found[name] = value
    return found


@dataclass
class Result:
    returncode: int
    stdout: str  # where the runner reads workflow commands (::error ...)
    stderr: str
    outputs: dict[str, str]

    @property
    def log(self) -> str:
        return self.stdout + self.stderr

    def table(self) -> list[list[str]]:
        """The outcome table the step printed (after its header, before
        verify's table, which has a header of its own)."""
        lines = self.stdout.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("TARGET "))
        rows = []
        for line in lines[start + 1 :]:
            if line.startswith("TARGET "):
                break
            if line and not line.startswith("::"):
                rows.append(line.split())
        return rows

    def errors(self) -> list[str]:
        return [line for line in self.stdout.splitlines() if line.startswith("::error")]


@dataclass
class Runner:
    """The runner's work tree (readable by its user): the action's checkout
    as the runner downloads it, a temp dir, a workspace, the command files."""

    root: Path
    #: the runner's user, who owns the work tree
    uid: int = 0
    gid: int = 0
    action: dict[str, Any] = field(
        default_factory=lambda: yaml.safe_load((ROOT / "action.yml").read_text())
    )
    env: dict[str, str] = field(default_factory=dict)

    @property
    def action_path(self) -> Path:
        return self.root / "_actions" / "qusd" / "qusd" / "v1"

    def prepare(self, mount: Path | None = None) -> None:
        """The files, afresh for each step; mount: where the job's container
        sees self.root."""
        shutil.rmtree(self.action_path, ignore_errors=True)  # not root: a job mounted it
        self.action_path.mkdir(parents=True)
        shutil.copy(ROOT / "action.yml", self.action_path / "action.yml")
        shutil.copytree(ROOT / "packaging" / "action", self.action_path / "packaging" / "action")
        shutil.copytree(ROOT / "qusd", self.action_path / "qusd",
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        for d in ("_temp", "workspace", "home"):
            (self.root / d).mkdir(exist_ok=True)
        seen = mount or self.root
        self.env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(seen / "home"),
            "CI": "true",
            "GITHUB_ACTIONS": "true",
            "RUNNER_OS": "Linux",
            "RUNNER_ARCH": "X64",
            "RUNNER_TEMP": str(seen / "_temp"),
            "RUNNER_TOOL_CACHE": "/opt/hostedtoolcache",
            "GITHUB_WORKSPACE": str(seen / "workspace"),
            "GITHUB_ACTION": "__qusd_qusd",
            "GITHUB_ACTION_REPOSITORY": "qusd/qusd",
            "GITHUB_ACTION_REF": "v1",
            "GITHUB_ACTION_PATH": str(self.action_path).replace(str(self.root), str(seen)),
        }
        for name in ("GITHUB_OUTPUT", "GITHUB_ENV", "GITHUB_PATH", "GITHUB_STEP_SUMMARY"):
            f = self.root / "_temp" / "_runner_file_commands" / name.lower()
            f.parent.mkdir(exist_ok=True)
            f.write_text("")
            self.env[name] = str(f).replace(str(self.root), str(seen))
        for p in [self.root, *self.root.rglob("*")]:
            os.chown(p, self.uid, self.gid)

    def step(self, inputs: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
        """The step's command line and environment, as the runner builds them."""
        declared = self.action["inputs"]
        unknown = set(inputs) - set(declared)
        assert not unknown, f"action.yml has no input {unknown}"
        context = {
            f"inputs.{n}": str(inputs.get(n, d.get("default", ""))) for n, d in declared.items()
        }
        context["github.action_path"] = self.env["GITHUB_ACTION_PATH"]
        (step,) = self.action["runs"]["steps"]
        assert self.action["runs"]["using"] == "composite" and step["shell"] == "bash"
        script = self.root / "_temp" / "step.sh"
        script.write_text(evaluate(step["run"], context))
        os.chown(script, self.uid, self.gid)
        env = {**self.env, **{k: evaluate(str(v), context) for k, v in step["env"].items()}}
        seen = self.env["RUNNER_TEMP"] + "/step.sh"
        return ["bash", "--noprofile", "--norc", "-eo", "pipefail", seen], env

    def result(self, res: subprocess.CompletedProcess[str]) -> Result:
        """The step's outcome and the Action's outputs, through action.yml."""
        written = read_outputs(
            (self.root / "_temp/_runner_file_commands/github_output").read_text()
        )
        (step,) = self.action["runs"]["steps"]
        context = {f"steps.{step['id']}.outputs.{k}": v for k, v in written.items()}
        outputs = {
            name: EXPRESSION.sub(lambda m: context.get(m.group(1), ""), o["value"])
            for name, o in self.action["outputs"].items()
        }
        return Result(res.returncode, res.stdout, res.stderr, outputs)


def _free_id(taken: set[int]) -> int:
    return next(i for i in range(2900, 60000) if i not in taken)


@pytest.fixture
def runner_box(sbx: Sandbox) -> Iterator[tuple[Sandbox, Runner]]:
    """A sandbox dressed as a GitHub runner: a `runner` user with
    passwordless sudo (passwd, shadow and sudoers bound over the host's in
    the sandbox only), and an apt-get that refuses (nothing may install on
    the host; the runner already has qemu-user-static)."""
    root = Path(tempfile.mkdtemp(prefix="qusd-runner-", dir="/tmp"))
    try:
        root.chmod(0o755)
        uid = _free_id({p.pw_uid for p in pwd.getpwall()})
        gid = _free_id({g.gr_gid for g in grp.getgrall()})
        etc = root / "etc"
        (etc / "sudoers.d").mkdir(parents=True)
        (etc / "passwd").write_text(
            Path("/etc/passwd").read_text() + f"runner:x:{uid}:{gid}::{root}/home:/bin/bash\n"
        )
        (etc / "group").write_text(Path("/etc/group").read_text() + f"runner:x:{gid}:\n")
        (etc / "shadow").write_text(
            Path("/etc/shadow").read_text() + "runner:*:19000:0:99999:7:::\n"
        )
        (etc / "sudoers.d" / "runner").write_text("runner ALL=(ALL) NOPASSWD:ALL\n")
        (etc / "sudoers.d" / "runner").chmod(0o440)
        (etc / "apt-get").write_text("#!/bin/sh\necho 'apt-get: not on the host' >&2\nexit 100\n")
        (etc / "apt-get").chmod(0o755)
        for src, dst in [("passwd", "/etc/passwd"), ("group", "/etc/group"),
                         ("shadow", "/etc/shadow"), ("sudoers.d", "/etc/sudoers.d"),
                         ("apt-get", "/usr/bin/apt-get")]:  # fmt: skip
            res = sbx.run(["mount", "--bind", etc / src, dst])
            assert res.returncode == 0, res.stderr
        yield sbx, Runner(root / "work", uid, gid)
    finally:
        shutil.rmtree(root)


def run_step(box: Sandbox, runner: Runner, inputs: Mapping[str, str], *, as_runner: bool) -> Result:
    """The step in the sandbox: as the runner's user (so through sudo), or
    as root (a self-hosted runner, a root job)."""
    run_as = runner if as_runner else Runner(runner.root)
    run_as.prepare()
    argv, env = run_as.step(inputs)
    if as_runner:
        user = ["setpriv", f"--reuid={run_as.uid}", f"--regid={run_as.gid}", "--clear-groups"]
        argv = [*user, "--", *argv]
    res = box.run(argv, env=env, cwd=env["GITHUB_WORKSPACE"], timeout=300)
    return run_as.result(res)


def load_distribution_rules(box: Sandbox) -> None:
    """What a runner has after `apt-get install qemu-user-static` (or at boot):
    systemd-binfmt loaded /usr/lib/binfmt.d/qemu-*.conf (flags OPF)."""
    res = box.run([SYSTEMD_BINFMT])
    assert res.returncode == 0, res.stderr
    assert box.kernel.entry("qemu-aarch64").flags == "POF"


def native_platforms() -> list[str]:
    return NATIVE_PLATFORMS[os.uname().machine]


def test_action_yml_declares_the_inputs_and_outputs() -> None:
    action: dict[str, Any] = yaml.safe_load((ROOT / "action.yml").read_text())
    assert set(action["inputs"]) == {"targets", "platforms", "flags", "replace", "verify"}
    assert action["inputs"]["replace"]["default"] == "true"
    assert action["inputs"]["verify"]["default"] == "true"
    assert set(action["outputs"]) == {"registrations", "platforms"}


def test_runner_with_the_distributions_rules_through_sudo(
    runner_box: tuple[Sandbox, Runner],
) -> None:
    """A stock runner: qemu-user-static's rules loaded (flags OPF). They
    already provide what is asked, so they are kept; one that does not (here
    disabled) is replaced, as root through the runner's sudo."""
    box, runner = runner_box
    load_distribution_rules(box)
    box.kernel.disable("qemu-riscv64")
    before = {e.name: e for e in box.kernel.entries()}

    inputs = {"targets": "arm64\nriscv64\n", "platforms": "linux/s390x,linux/amd64"}
    result = run_step(box, runner, inputs, as_runner=True)
    assert result.returncode == 0, result.log
    assert result.errors() == []
    assert "apt-get" not in result.log
    assert result.table() == [
        ["aarch64", "qemu-aarch64", "POF", "provided", "/usr/libexec/qemu-binfmt/aarch64-binfmt-P"],
        ["riscv64", "qemu-riscv64", "F", "replaced", "/usr/bin/qemu-riscv64-static"],
        ["s390x", "qemu-s390x", "POF", "provided", "/usr/libexec/qemu-binfmt/s390x-binfmt-P"],
        ["x86_64", "-", "-", "native", "-"],
    ]
    after = {e.name: e for e in box.kernel.entries()}
    assert after.keys() == before.keys()
    assert {n: e for n, e in after.items() if n != "qemu-riscv64"} == {
        n: e for n, e in before.items() if n != "qemu-riscv64"
    }
    assert box.run([busybox_path("arm64"), "uname", "-m"]).stdout.strip() == "aarch64"

    listed = json.loads(result.outputs["registrations"])
    assert [r["name"] for r in listed] == sorted(after)
    platforms = result.outputs["platforms"].split(",")
    assert platforms[:2] == native_platforms()
    assert {"linux/arm64", "linux/riscv64", "linux/s390x", "linux/arm/v7"} <= set(platforms)


def test_replace_false_keeps_the_table_and_fails_with_an_annotation(
    runner_box: tuple[Sandbox, Runner],
) -> None:
    """An entry that does not provide the target (qemu-user-binfmt's: the
    dynamic interpreter, no F) is a conflict when `replace: false`; by
    default it is replaced."""
    box, runner = runner_box
    load_distribution_rules(box)
    riscv64 = catalog.builtin().get("riscv64")
    box.kernel.remove("qemu-riscv64")
    box.kernel.register(riscv64.rule("/usr/bin/qemu-riscv64", ""))
    before = box.kernel.entries()

    result = run_step(box, runner, {"targets": "aarch64 riscv64", "replace": "false"},
                      as_runner=False)  # fmt: skip
    assert result.returncode == 1, result.log
    assert result.errors() == [
        "::error title=qusd binfmt::qemu-riscv64 is registered (interpreter "
        "/usr/bin/qemu-riscv64, flags (none)) but does not provide riscv64 with flags F: "
        "it lacks flag(s) F; set the input `replace: true` to replace it"
    ]
    assert [row[:4] for row in result.table()] == [
        ["aarch64", "qemu-aarch64", "POF", "provided"],
        ["riscv64", "qemu-riscv64", "-", "conflict"],
    ]
    assert box.kernel.entries() == before
    assert [r["name"] for r in json.loads(result.outputs["registrations"])] == [
        e.name for e in before
    ]

    result = run_step(box, runner, {"targets": "aarch64 riscv64"}, as_runner=False)
    assert result.returncode == 0, result.log
    assert result.table()[1] == [
        "riscv64", "qemu-riscv64", "F", "replaced", "/usr/bin/qemu-riscv64-static"
    ]  # fmt: skip


def test_an_empty_table_gets_every_foreign_target(runner_box: tuple[Sandbox, Runner]) -> None:
    """No inputs: every target of another family than the runner's, with F
    and never C; a second run finds them all provided."""
    box, runner = runner_box
    result = run_step(box, runner, {}, as_runner=False)
    assert result.returncode == 0, result.log
    rows = result.table()
    assert len(rows) >= 28
    assert {(r[2], r[3]) for r in rows} == {("F", "registered")}
    assert not {"x86_64", "i386", "i486"} & {r[0] for r in rows}
    for arch in ("arm64", "s390x", "ppc64el", "mips64el"):
        res = box.run([busybox_path(arch), "uname", "-m"])
        assert res.returncode == 0, (arch, res.stderr)
    assert len(json.loads(result.outputs["registrations"])) == len(rows)
    platforms = result.outputs["platforms"].split(",")
    assert platforms[:2] == native_platforms()
    assert {"linux/arm64", "linux/ppc64le", "linux/s390x", "linux/riscv64"} <= set(platforms)

    again = run_step(box, runner, {"platforms": "all"}, as_runner=False)
    assert again.returncode == 0, again.log
    assert {r[3] for r in again.table()} == {"provided"}


def test_a_missing_interpreter_fails_with_an_annotation(
    runner_box: tuple[Sandbox, Runner],
) -> None:
    """The runner's QEMU lacks riscv64 (bound away in the sandbox): nothing
    is registered, the annotation names the target and the fix, the outputs
    are set all the same."""
    box, runner = runner_box
    for name in ("qemu-riscv64-static", "qemu-riscv64"):
        res = box.run(["mount", "--bind", "/dev/null", f"/usr/bin/{name}"])
        assert res.returncode == 0, res.stderr
    result = run_step(box, runner, {"platforms": "linux/arm64,linux/riscv64"}, as_runner=True)
    assert result.returncode == 1, result.log
    assert result.errors() == [
        "::error title=qusd binfmt::no interpreter for riscv64: no qemu-riscv64-static or "
        "qemu-riscv64 in /var/lib/qusd/interpreters, /usr/bin, /usr/local/bin, "
        "/usr/libexec/qemu-binfmt; install "
        "qemu-user-static (the Action does when no QEMU interpreter is present) or drop "
        "riscv64 from the inputs"
    ]
    assert [row[3:] for row in result.table()] == [["not", "registered", "-"],
                                                    ["no", "interpreter", "-"]]  # fmt: skip
    assert box.kernel.names() == []
    assert json.loads(result.outputs["registrations"]) == []
    assert result.outputs["platforms"].split(",") == native_platforms()


def test_an_unknown_target_fails_with_an_annotation(runner_box: tuple[Sandbox, Runner]) -> None:
    box, runner = runner_box
    result = run_step(box, runner, {"targets": "aarch64 vax"}, as_runner=True)
    assert result.returncode == 1, result.log
    (error,) = result.errors()
    assert error.startswith("::error title=qusd binfmt::unknown target 'vax'; known targets: ")
    assert box.kernel.names() == []


# -- container jobs ------------------------------------------------------------

REASON = containers.unsupported_reason()
needs_containers = pytest.mark.skipif(REASON is not None, reason=REASON or "")


class JobContainer:
    """A container job as GitHub runs one: the job's container started once
    (root, no sudo, kept alive with `tail -f /dev/null`), the runner's work
    tree mounted at /__w, each step a `podman exec`. The container joined a
    sandbox, so what it registers lands in the sandbox's table."""

    def __init__(self, box: Sandbox, image: str, options: Sequence[str]) -> None:
        self.engine = containers.Engine()
        self.engine.check_userns(box.pid, image)
        self.tree = Path(tempfile.mkdtemp(prefix="qusd-job-", dir="/tmp"))
        self.runner = Runner(self.tree / "work")
        self.runner.prepare(mount=Path(IN_CONTAINER))
        foreign = ["-v", f"{busybox_path('arm64').parent}:/foreign:ro"]
        res = self.engine.container(box.pid, image, "-f", "/dev/null", options=[
            "-d", "--entrypoint", "tail", "-v", f"{self.runner.root}:{IN_CONTAINER}",
            *foreign, *options,
        ])  # fmt: skip
        assert res.returncode == 0, res.stderr
        self.id = res.stdout.strip()

    def step(self, inputs: Mapping[str, str]) -> Result:
        self.runner.prepare(mount=Path(IN_CONTAINER))
        argv, env = self.runner.step(inputs)
        options = [f"--env={k}={v}" for k, v in env.items()]
        argv = ["podman", "exec", "-w", env["GITHUB_WORKSPACE"], *options, self.id, *argv]
        return self.runner.result(self.engine.run(argv, timeout=600))

    def exec(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.engine.run(["podman", "exec", self.id, *argv])

    def close(self) -> None:
        self.engine.run(["podman", "rm", "-f", "-t", "0", self.id])
        shutil.rmtree(self.tree)


@needs_containers
def test_a_container_job_installs_qemu_with_apt(sbx: Sandbox) -> None:
    """debian:bookworm with python3 as the job's container: the Action runs
    as root without sudo, installs qemu-user-static with apt (its output in
    a log group) and registers; a later step of the job, and the runner
    itself, run arm64 programs through it."""
    image = containers.image(containers.Engine(), "python", containers.host_arch())
    archives = containers.CACHE / "apt-archives"  # downloads only, as a proxy would keep them
    archives.mkdir(parents=True, exist_ok=True)
    job = JobContainer(sbx, image, ["--network", "host",
                                    "-v", f"{archives}:/var/cache/apt/archives"])  # fmt: skip
    try:
        result = job.step({"platforms": "linux/arm64"})
        assert result.returncode == 0, result.log
        assert "::group::apt-get install qemu-user-static" in result.stdout
        assert "Setting up qemu-user-static" in result.stdout  # apt's own output, not hidden
        assert "sudo" not in result.log  # there is none in the image
        assert result.table() == [
            ["aarch64", "qemu-aarch64", "F", "registered", "/usr/bin/qemu-aarch64-static"]
        ]
        assert "linux/arm64" in result.outputs["platforms"].split(",")
        assert sbx.kernel.names() == ["qemu-aarch64"]
        assert job.exec("/foreign/busybox", "uname", "-m").stdout.strip() == "aarch64"
        assert sbx.run([busybox_path("arm64"), "uname", "-m"]).stdout.strip() == "aarch64"
    finally:
        job.close()


@needs_containers
def test_a_python_too_old_is_a_clear_error(sbx: Sandbox) -> None:
    """debian:bullseye's Python 3.9: one annotation before anything changes
    (no apt, no registration), where the one-shot would have registered and
    then crashed."""
    image = containers.base(containers.Engine(), "amd64", "bullseye", "python3")
    job = JobContainer(sbx, image, [])
    try:
        result = job.step({"targets": "aarch64"})
    finally:
        job.close()
    assert result.returncode == 1, result.log
    assert result.stdout.splitlines() == [
        "::error title=qusd binfmt::qusd binfmt needs Python 3.10 or later, and "
        "/usr/bin/python3 is Python 3.9.2: use a newer runner image or run "
        "actions/setup-python before this step"
    ]
    assert sbx.kernel.names() == []
    assert result.outputs == {"registrations": "", "platforms": ""}
