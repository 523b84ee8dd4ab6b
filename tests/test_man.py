"""The man pages in docs/man: they render cleanly, and they keep up with the
code: every option each program's parser defines, every setting of Config."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator

import pytest

from qusd import cli, daemon, ocihook, oneshot, qus
from qusd.config import Config
from tests.conftest import ROOT

MAN = ROOT / "docs/man"
PAGES = ["qusd.8", "qusctl.1", "qusd-binfmt.1", "qusd-oci-hook.1", "qusd.toml.5", "qus-register.1"]
#: The page of each program, and the function that builds its parser.
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "qusd.8": daemon.parser,
    "qusctl.1": cli.parser,
    "qusd-binfmt.1": oneshot.parser,
    "qusd-oci-hook.1": ocihook.parser,
}


def options(p: argparse.ArgumentParser) -> Iterator[str]:
    """Every option string of p and of its subcommands, but -h/--help and
    the hidden (SUPPRESSed) ones."""
    for action in p._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from options(sub)
        yield from action.option_strings


def text(page: str) -> str:
    """The page's source as words: roff's \\- is a -, font changes go."""
    source = (MAN / page).read_text()
    return re.sub(r"\\f(?:[BIRP]|\(\w\w|\[\w*\])", "", source).replace("\\-", "-")


def mentions(words: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", words) is not None


@pytest.mark.parametrize("page", PAGES)
def test_renders_without_warnings(page: str) -> None:
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff is not installed (apt-get install groff-base)")
    res = subprocess.run(
        [groff, "-man", "-ww", "-z", "-Tutf8", str(MAN / page)],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", res.stderr


@pytest.mark.parametrize("page", sorted(PARSERS))
def test_every_option_is_documented(page: str) -> None:
    opts = sorted(set(options(PARSERS[page]())))
    assert opts, "the parser walk found no options"
    words = text(page)
    missing = [o for o in opts if not mentions(words, o)]
    assert not missing, f"{page} does not mention {missing}"


def test_qus_register_documents_every_spelling() -> None:
    """qus-register reads its command line itself (register.sh's and
    qemu-binfmt-conf.sh's spellings): each one, and each environment
    variable it reads, is on its page."""
    words = text("qus-register.1")
    spellings = {*qus._LONG, *qus._CONF, *(f"-{c}" for c in "hilerst")}
    missing = [o for o in sorted(spellings) if not mentions(words, o)]
    assert not missing, f"qus-register.1 does not mention {missing}"
    missing = [v for v in qus.ENVIRONMENT if not mentions(words, v)]
    assert not missing, f"qus-register.1 does not mention {missing}"
    assert set(qus.ENVIRONMENT) == set(re.findall(r'env\.get\("(\w+)"', SOURCE_QUS))


SOURCE_QUS = (ROOT / "qusd/qus.py").read_text()


def test_options_walk_subcommands() -> None:
    """The walk reaches subcommands' options and skips the hidden ones."""
    opts = set(options(cli.parser()))
    assert {"--socket", "--version", "--allow-untrusted-interpreter", "--pid"} <= opts
    assert "--help" not in opts
    assert "--binfmt-path" not in opts


def test_every_setting_is_documented() -> None:
    words = text("qusd.toml.5")
    names = [f.name for f in dataclasses.fields(Config) if f.name != "sources"]
    missing = [n for n in names if re.search(rf"(?<!\w){n}(?!\w)", words) is None]
    assert not missing, f"qusd.toml.5 does not name {missing}"


def test_manpages_file_lists_every_page() -> None:
    listed = (ROOT / "packaging/debian/qusd.manpages").read_text().split()
    assert listed == [f"docs/man/{page}" for page in PAGES]
    assert sorted(p.name for p in MAN.iterdir()) == sorted(PAGES)
