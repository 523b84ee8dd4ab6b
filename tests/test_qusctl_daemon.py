"""qusctl's daemon commands, the installed script against a real daemon in
its sandbox: output, --json, exit statuses and messages."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from qusd import catalog, interpreters
from qusd.binfmt import Rule
from tests.conftest import Daemon, Sandbox, busybox_path, interpreter
from tests.test_daemon import EnteredDaemon

QUSCTL = str(Path(sys.executable).parent / "qusctl")
REG_HEADERS = ["NAME", "ENABLED", "TARGET", "FLAGS", "QUSD", "INTERPRETER"]
WINE = Rule(name="DOSWin", interpreter="/usr/bin/wine", extension="exe")


def qusctl(
    sock: str | None, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [QUSCTL, *(["--socket", sock] if sock is not None else []), *args]
    base = {k: v for k, v in os.environ.items() if k != "QUSD_SOCKET"}
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, check=False, env={**base, **(env or {})}
    )


def ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, (res.returncode, res.stderr)
    assert res.stderr == ""
    return res.stdout


def one_line_error(res: subprocess.CompletedProcess[str], status: int) -> str:
    """The error message; the command failed with status and one line."""
    assert res.returncode == status, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qusctl: "), res.stderr
    return lines[0]


def parse_table(text: str) -> list[dict[str, str]]:
    """Rows of an aligned table; asserts every cell starts under its header."""
    header, *lines = text.rstrip("\n").splitlines()
    names = header.split()
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    ends: list[int | None] = [*starts[1:], None]
    rows = []
    for line in lines:
        for s in starts[1:]:
            assert line[s - 2 : s] == "  " and line[s] != " ", f"misaligned at {s}: {line!r}"
        rows.append({n: line[a:b].strip() for n, a, b in zip(names, starts, ends, strict=True)})
    return rows


def api_regs(d: Daemon) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in d.client.get("/v1/registrations")}


# -- register ------------------------------------------------------------------------


def test_register_prints_an_aligned_table_then_unchanged(daemon: Daemon) -> None:
    res = qusctl(daemon.socket, "register", "arm64", "linux/s390x")
    out = ok(res)
    assert out.splitlines()[0].split() == [*REG_HEADERS, "RESULT"]
    rows = parse_table(out)
    assert rows == [
        {"NAME": "qemu-aarch64", "ENABLED": "yes", "TARGET": "aarch64", "FLAGS": "F",
         "QUSD": "persistent", "INTERPRETER": interpreter("aarch64"), "RESULT": "registered"},
        {"NAME": "qemu-s390x", "ENABLED": "yes", "TARGET": "s390x", "FLAGS": "F",
         "QUSD": "persistent", "INTERPRETER": interpreter("s390x"), "RESULT": "registered"},
    ]  # fmt: skip
    assert sorted(e.name for e in daemon.table()) == ["qemu-aarch64", "qemu-s390x"]

    again = parse_table(ok(qusctl(daemon.socket, "register", "aarch64", "s390x")))
    assert [(r["NAME"], r["RESULT"]) for r in again] == [
        ("qemu-aarch64", "unchanged"),
        ("qemu-s390x", "unchanged"),
    ]


def test_register_json_prints_the_api_document(daemon: Daemon) -> None:
    interpreter("aarch64")
    doc = json.loads(ok(qusctl(daemon.socket, "register", "--json", "arm64")))
    assert doc == {"registered": [api_regs(daemon)["qemu-aarch64"]], "unchanged": []}
    assert doc["registered"][0]["persistent"] is True
    doc = json.loads(ok(qusctl(daemon.socket, "register", "--json", "arm64")))
    assert doc == {"registered": [], "unchanged": [api_regs(daemon)["qemu-aarch64"]]}


def test_register_with_no_target_registers_every_foreign_target(daemon: Daemon) -> None:
    interpreter("aarch64")
    host = catalog.family_of(catalog.host_machine())
    want = [
        t.entry_name for t in catalog.builtin().foreign(host) if interpreters.find(t) is not None
    ]
    rows = parse_table(ok(qusctl(daemon.socket, "register")))
    assert [r["NAME"] for r in rows] == want
    assert {r["RESULT"] for r in rows} == {"registered"}
    assert sorted(e.name for e in daemon.table()) == sorted(want)


def test_register_no_persist(daemon: Daemon) -> None:
    interpreter("s390x")
    (row,) = parse_table(ok(qusctl(daemon.socket, "register", "--no-persist", "s390x")))
    assert (row["QUSD"], row["RESULT"]) == ("managed", "registered")
    reg = api_regs(daemon)["qemu-s390x"]
    assert (reg["managed"], reg["persistent"]) == (True, False)


def test_register_conflict_message_and_replace(daemon: Daemon) -> None:
    interpreter("aarch64")
    ok(qusctl(daemon.socket, "register", "arm64"))
    res = qusctl(daemon.socket, "register", "--flags", "OC", "arm64")
    assert res.returncode != 0 and res.stdout == ""
    msg = one_line_error(res, res.returncode)
    assert "qemu-aarch64 is already registered with another definition" in msg
    assert "flags F" in msg and "replace" in msg
    assert daemon.inside.kernel.entry("qemu-aarch64").flags == "F"  # untouched

    (row,) = parse_table(
        ok(qusctl(daemon.socket, "register", "--replace", "--flags", "OC", "arm64"))
    )
    assert (row["FLAGS"], row["RESULT"]) == ("OC", "registered")
    assert daemon.inside.kernel.entry("qemu-aarch64").flags == "OC"
    assert api_regs(daemon)["qemu-aarch64"]["managed"] is True


def test_register_conflict_exit_status_is_73(daemon: Daemon) -> None:
    interpreter("aarch64")
    ok(qusctl(daemon.socket, "register", "arm64"))
    res = qusctl(daemon.socket, "register", "--flags", "OC", "arm64")
    one_line_error(res, 73)


def test_validation_errors_exit_65_naming_the_field(daemon: Daemon) -> None:
    interpreter("aarch64")
    msg = one_line_error(qusctl(daemon.socket, "register", "--flags", "X", "arm64"), 65)
    assert msg == "qusctl: flags: unknown flag(s) 'X'; use any of P, O, C, F"
    msg = one_line_error(qusctl(daemon.socket, "register", "vax"), 65)
    assert msg.startswith("qusctl: targets: unknown target 'vax'; known targets: i386, ")
    assert daemon.table() == []


# -- unregister, enable, disable -------------------------------------------------------


def test_unregister(daemon: Daemon) -> None:
    interpreter("aarch64")
    ok(qusctl(daemon.socket, "register", "arm64", "s390x"))
    res = qusctl(daemon.socket, "unregister", "qemu-aarch64", "qemu-nope")
    assert res.stdout == "unregistered qemu-aarch64\n"
    assert one_line_error(res, 66) == "qusctl: no binfmt_misc entry named 'qemu-nope'"
    assert [e.name for e in daemon.table()] == ["qemu-s390x"]
    assert ok(qusctl(daemon.socket, "unregister", "qemu-s390x")) == "unregistered qemu-s390x\n"
    assert daemon.table() == []


def test_disable_and_enable_change_what_exec_does(daemon: Daemon) -> None:
    bb = str(busybox_path("arm64"))
    ok(qusctl(daemon.socket, "register", "arm64"))
    assert ok(qusctl(daemon.socket, "disable", "qemu-aarch64")) == "qemu-aarch64 disabled\n"
    assert daemon.inside.kernel.entry("qemu-aarch64").enabled is False
    res = qusctl(daemon.socket, "run", "--", bb, "true")
    assert res.returncode != 0 and "Exec format error" in res.stderr

    doc = json.loads(ok(qusctl(daemon.socket, "enable", "--json", "qemu-aarch64")))
    assert doc == api_regs(daemon)["qemu-aarch64"] and doc["enabled"] is True
    assert daemon.inside.kernel.entry("qemu-aarch64").enabled is True
    assert ok(qusctl(daemon.socket, "run", "--", bb, "uname", "-m")) == "aarch64\n"

    msg = one_line_error(qusctl(daemon.socket, "disable", "qemu-nope"), 66)
    assert "'qemu-nope'" in msg


# -- list, status, targets, reset -----------------------------------------------------


def test_list_table_and_json(daemon: Daemon) -> None:
    interpreter("aarch64")
    assert ok(qusctl(daemon.socket, "list")) == "no entries\n"
    ok(qusctl(daemon.socket, "register", "arm64"))
    ok(qusctl(daemon.socket, "register", "--no-persist", "--flags", "", "s390x"))
    daemon.inside.kernel.register(WINE)  # another tool's entry

    out = ok(qusctl(daemon.socket, "list"))
    assert out.splitlines()[0].split() == REG_HEADERS
    rows = {r["NAME"]: r for r in parse_table(out)}
    assert set(rows) == {"DOSWin", "qemu-aarch64", "qemu-s390x"}
    assert (rows["DOSWin"]["TARGET"], rows["DOSWin"]["FLAGS"], rows["DOSWin"]["QUSD"]) == (
        "-",
        "-",
        "-",
    )
    assert rows["DOSWin"]["INTERPRETER"] == "/usr/bin/wine"
    assert (rows["qemu-aarch64"]["QUSD"], rows["qemu-aarch64"]["FLAGS"]) == ("persistent", "F")
    assert (rows["qemu-s390x"]["QUSD"], rows["qemu-s390x"]["FLAGS"]) == ("managed", "-")

    doc = json.loads(ok(qusctl(daemon.socket, "list", "--json")))
    assert doc == daemon.client.get("/v1/registrations")
    assert {r["name"]: r["managed"] for r in doc} == {
        "DOSWin": False,
        "qemu-aarch64": True,
        "qemu-s390x": True,
    }


def test_status(daemon: Daemon) -> None:
    interpreter("aarch64")
    ok(qusctl(daemon.socket, "register", "arm64"))
    daemon.inside.kernel.register(WINE)
    lines = ok(qusctl(daemon.socket, "status")).splitlines()
    assert lines[0].startswith("qusd 0.1.0 on Linux " + os.uname().release)
    assert lines[1:] == [
        "binfmt_misc: /proc/sys/fs/binfmt_misc, enabled",
        f"sandbox: pid {daemon.pid}",
        "entries: 2 (1 managed, 1 persistent)",
        f"catalog: builtin; state: {daemon.state_dir / 'state.json'}",
    ]
    doc = json.loads(ok(qusctl(daemon.socket, "status", "--json")))
    assert doc == daemon.client.get("/v1/status")
    assert doc["counts"] == {"entries": 2, "managed": 1, "persistent": 1, "recorded": 1}


def test_targets(daemon: Daemon) -> None:
    out = ok(qusctl(daemon.socket, "targets"))
    assert out.splitlines()[0].split() == [
        "TARGET", "FAMILY", "NATIVE", "DECIDED", "INTERPRETER", "LINKING", "PROVISIONED"
    ]  # fmt: skip
    rows = {r["TARGET"]: r for r in parse_table(out)}
    assert list(rows) == catalog.builtin().names()
    assert rows["aarch64"] == {
        "TARGET": "aarch64",
        "FAMILY": "arm",
        "NATIVE": "no",
        "DECIDED": "probe",
        "INTERPRETER": interpreter("aarch64"),
        "LINKING": "static",
        "PROVISIONED": "-",
    }
    host = catalog.family_of(catalog.host_machine())
    for t in catalog.builtin():
        assert rows[t.name]["NATIVE"] == ("yes" if t.family == host else "no")
    doc = json.loads(ok(qusctl(daemon.socket, "targets", "--json")))
    assert doc == daemon.client.get("/v1/targets")


def test_reset_scopes(daemon: Daemon) -> None:
    interpreter("aarch64")
    ok(qusctl(daemon.socket, "register", "arm64"))
    daemon.inside.kernel.register(catalog.builtin().get("s390x").rule(interpreter("s390x")))
    daemon.inside.kernel.register(WINE)

    def names() -> list[str]:
        return [e.name for e in daemon.table()]

    assert ok(qusctl(daemon.socket, "reset")) == "removed qemu-aarch64\n"  # managed: default
    assert names() == ["DOSWin", "qemu-s390x"]
    assert ok(qusctl(daemon.socket, "reset", "--scope", "managed")) == "nothing to remove\n"
    assert ok(qusctl(daemon.socket, "reset", "--scope", "qemu")) == "removed qemu-s390x\n"
    assert names() == ["DOSWin"]
    doc = json.loads(ok(qusctl(daemon.socket, "reset", "--scope", "all", "--json")))
    assert doc == {"removed": ["DOSWin"]}
    assert names() == []
    assert daemon.client.get("/v1/status")["counts"]["recorded"] == 0


# -- run --------------------------------------------------------------------------------


def test_run_without_pid_enters_the_daemons_sandbox(daemon: Daemon) -> None:
    bb = str(busybox_path("arm64"))
    ok(qusctl(daemon.socket, "register", "arm64"))
    assert ok(qusctl(daemon.socket, "run", "--", bb, "uname", "-m")) == "aarch64\n"
    out = ok(qusctl(daemon.socket, "run", "--", "ls", "/proc/sys/fs/binfmt_misc"))
    assert out.split() == ["qemu-aarch64", "register", "status"]


def test_run_refuses_a_daemon_that_is_not_in_a_sandbox(sbx: Sandbox, tmp_path: Path) -> None:
    d = EnteredDaemon(sbx, tmp_path, "--reconcile-interval", "0", state_dir=tmp_path / "s")
    try:
        assert d.client.get("/v1/status")["sandbox"] is None
        msg = one_line_error(qusctl(d.socket, "run", "--", "true"), 1)
        assert msg == (
            "qusctl: the daemon is not in a sandbox: programs run anywhere already see its table"
        )
    finally:
        d.stop()


# -- reaching the daemon ----------------------------------------------------------------


def test_daemon_not_running_exits_69_and_says_to_start_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere.sock")
    for args in (["list"], ["register", "arm64"], ["status", "--json"]):
        msg = one_line_error(qusctl(missing, *args), 69)
        assert msg == (
            f"qusctl: qusd is not running: no socket at {missing}; start it with "
            "'systemctl start qusd' (or pass --socket)"
        )
    # a socket file left by a crash: nobody listens
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    msg = one_line_error(qusctl(str(stale), "list"), 69)
    assert f"nothing listens on {stale}" in msg and "start it" in msg


def test_qusd_socket_environment_variable(daemon: Daemon, tmp_path: Path) -> None:
    interpreter("aarch64")
    ok(qusctl(daemon.socket, "register", "arm64"))
    out = ok(qusctl(None, "list", env={"QUSD_SOCKET": daemon.socket}))
    assert [r["NAME"] for r in parse_table(out)] == ["qemu-aarch64"]
    # it is the variable that was used: pointing elsewhere fails, naming that path
    elsewhere = str(tmp_path / "elsewhere.sock")
    msg = one_line_error(qusctl(None, "list", env={"QUSD_SOCKET": elsewhere}), 69)
    assert f"no socket at {elsewhere}" in msg
    # --socket wins over the variable
    out = ok(qusctl(daemon.socket, "list", env={"QUSD_SOCKET": elsewhere}))
    assert "qemu-aarch64" in out


# -- conventions ------------------------------------------------------------------------


def test_options_before_or_after_the_command_and_all(daemon: Daemon) -> None:
    interpreter("aarch64")
    host = catalog.family_of(catalog.host_machine())
    want = [t.entry_name for t in interpreters.foreign_with_interpreters(catalog.builtin(), host)]
    doc = json.loads(ok(qusctl(None, "--json", "register", "all", "--socket", daemon.socket)))
    assert [r["name"] for r in doc["registered"]] == want
    before = json.loads(ok(qusctl(daemon.socket, "--json", "list")))
    after = json.loads(ok(qusctl(None, "list", "--json", "--socket", daemon.socket)))
    assert before == after == daemon.client.get("/v1/registrations")
    doc = json.loads(ok(qusctl(daemon.socket, "unregister", "--json", "qemu-aarch64")))
    assert doc == {"unregistered": ["qemu-aarch64"]}


def test_list_json_into_a_closed_pipe_is_quiet(daemon: Daemon) -> None:
    interpreter("aarch64")
    ok(qusctl(daemon.socket, "register"))
    r, w = os.pipe()
    os.close(r)
    try:
        res = subprocess.run([QUSCTL, "--socket", daemon.socket, "list", "--json"], stdout=w,
                             stderr=subprocess.PIPE, timeout=60, check=False)  # fmt: skip
    finally:
        os.close(w)
    assert (res.returncode, res.stderr) == (-signal.SIGPIPE, b"")


def test_the_daemon_counts_in_words(daemon: Daemon, tmp_path: Path) -> None:
    assert "(0 entries, 0 managed)" in daemon.log.read_text()
    ok(qusctl(daemon.socket, "register", "arm64"))
    daemon.stop()
    again = Daemon(tmp_path)
    try:
        assert "(1 entry, 1 managed)" in again.log.read_text()
    finally:
        again.stop()
