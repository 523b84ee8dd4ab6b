"""Shell completion for qusd, qusctl and qusd-binfmt, generated from the
argparse parsers by shtab (packaging/completions.sh), loaded the way each
shell loads a package's completions and asked to complete real lines: bash
through bash-completion's loader, zsh's completion system on a
pseudo-terminal, fish's `complete -C`. tests/test_deb.py asks the files
the package installs the same questions."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")
ZSH_COMPLETE = ROOT / "tests/data/zsh-complete.zsh"
PROGRAMS = ("qusd", "qusctl", "qusd-binfmt")
#: where the programs are (fish completes only commands it finds)
BIN = Path(sys.executable).parent
#: a line typed, and what TAB must offer
CASES = [
    ("qusctl reg", ["register"]),
    ("qusctl re", ["reconcile", "register", "reset"]),
    ("qusd ch", ["check-config"]),
    ("qusd-binfmt r", ["register", "reset"]),
    ("qusctl register aarch", ["aarch64", "aarch64_be"]),
    ("qusctl sandbox --register s390", ["s390x"]),
    ("qusd-binfmt register riscv", ["riscv32", "riscv64"]),
    ("qusctl reset --scope ", ["all", "managed", "qemu"]),
    ("qusctl --json list --so", ["--socket"]),
    ("qusd serve --log-l", ["--log-level"]),
]


def generate(python: str, root: Path) -> Path:
    """Run packaging/completions.sh; the share directory it filled."""
    subprocess.run(["sh", str(ROOT / "packaging/completions.sh"), python, str(root)], check=True,
                   timeout=120, capture_output=True)  # fmt: skip
    return root / "usr/share"


@pytest.fixture(scope="module")
def share(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(sys.executable, tmp_path_factory.mktemp("completion"))


def need(tool: str) -> str:
    found = shutil.which(tool)
    assert found, f"{tool} is missing: tools/setup-system.sh installs it"
    return found


def bash_complete(share: Path, line: str, home: Path) -> list[str]:
    """What bash offers: bash-completion loads the command's completion from
    share (XDG_DATA_DIRS, as it finds a package's), then the function it
    registered with `complete -F` is called as TAB calls it."""
    assert BASH_COMPLETION.exists(), "bash-completion is missing: tools/setup-system.sh installs it"
    words = line.split(" ")
    script = f"""
        source {BASH_COMPLETION}
        __load_completion {shlex.quote(words[0])} || exit 3
        spec=$(complete -p {shlex.quote(words[0])}) || exit 4
        fn=${{spec##*-F }}; fn=${{fn%% *}}
        COMP_WORDS=({" ".join(shlex.quote(w) for w in words)})
        COMP_CWORD={len(words) - 1}
        COMP_LINE={shlex.quote(line)}; COMP_POINT=${{#COMP_LINE}}
        "$fn" {shlex.quote(words[0])} {shlex.quote(words[-1])} {shlex.quote(words[-2])}
        printf '%s\\n' "${{COMPREPLY[@]}}"
    """
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "XDG_DATA_DIRS": str(share),
           "BASH_COMPLETION_USER_DIR": str(home / "none")}  # fmt: skip
    res = subprocess.run([need("bash"), "--norc", "--noprofile", "-c", script], env=env,
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert res.returncode == 0, (res.returncode, res.stderr)
    return sorted({w for w in res.stdout.split("\n") if w})


def zsh_complete(share: Path, line: str, home: Path) -> list[str]:
    """What zsh's completion system (compinit) offers on a pseudo-terminal,
    with the package's vendor-completions directory in $fpath."""
    res = subprocess.run(
        [need("zsh"), "-f", str(ZSH_COMPLETE), str(share / "zsh/vendor-completions"), line],
        env={"PATH": "/usr/bin:/bin", "HOME": str(home), "TERM": "dumb"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return sorted(res.stdout.split())


def fish_complete(share: Path, line: str, home: Path) -> list[str]:
    """What fish offers: `complete -C` in a fish that finds the package's
    vendor_completions.d through XDG_DATA_DIRS and autoloads the command's
    file from it (fish does so for commands on PATH)."""
    res = subprocess.run(
        [need("fish"), "-c", f"complete -C {shlex.quote(line)}"],
        env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(home), "XDG_DATA_DIRS": str(share)},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return sorted({row.split("\t")[0] for row in res.stdout.splitlines() if row})


COMPLETERS = {"bash": bash_complete, "zsh": zsh_complete, "fish": fish_complete}


def check_completes(share: Path, shell: str, home: Path) -> None:
    """Every case, in one shell: exactly the expected words."""
    for line, want in CASES:
        got = COMPLETERS[shell](share, line, home)
        assert got == want, f"{shell}: {line!r} offers {got}, not {want}"


def test_every_program_has_a_file_for_every_shell(share: Path) -> None:
    for prog in PROGRAMS:
        for path in (
            share / "bash-completion/completions" / prog,
            share / "zsh/vendor-completions" / f"_{prog}",
            share / "fish/vendor_completions.d" / f"{prog}.fish",
        ):
            assert path.stat().st_size > 1000, path
            assert "AUTOMATICALLY GENERATED by https://github.com/tqdm/shtab" in path.read_text()


@pytest.mark.parametrize("shell", sorted(COMPLETERS))
def test_tab_completes(share: Path, shell: str, tmp_path: Path) -> None:
    check_completes(share, shell, tmp_path)


def test_bash_registers_each_program(share: Path, tmp_path: Path) -> None:
    """`complete -p` after loading: each program has its own function (three
    files loaded in one shell must not overwrite each other's)."""
    script = f"source {BASH_COMPLETION}; " + "; ".join(
        f"__load_completion {p} && complete -p {p}" for p in PROGRAMS
    )
    res = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True,
                         text=True, timeout=60, check=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                              "XDG_DATA_DIRS": str(share)})  # fmt: skip
    assert res.stdout.splitlines() == [
        "complete -o bashdefault -F _shtab_qusd qusd",
        "complete -o bashdefault -F _shtab_qusctl qusctl",
        "complete -o bashdefault -F _shtab_qusd_binfmt qusd-binfmt",
    ]
    # and with all three loaded, each still completes its own commands
    assert bash_complete(share, "qusctl re", tmp_path) == ["reconcile", "register", "reset"]
