"""One table of exit statuses: qusd.errors.CODES (every error's status),
plus 0, 1, 2 and 130, stated the same way in the README and in every man
page of a program (a page may add a note of its own after the shared
meaning)."""

from __future__ import annotations

import re

import pytest

from qusd.errors import CODES
from tests.conftest import ROOT

#: success, other failure, usage (argparse), interrupted (Ctrl-C)
BESIDE_CODES = {0, 1, 2, 130}
PAGES = ["qusd.8", "qusctl.1", "qusd-binfmt.1"]


def plain(text: str) -> str:
    """Words only: roff's escapes and macros, markdown's backticks, the
    case of the first letter and the final period go."""
    text = re.sub(r"\\f(?:[BIRP]|\(\w\w|\[\w*\])", "", text)
    text = text.replace("\\-", "-").replace("\\c", "").replace("`", "")
    text = re.sub(r"^\.(?:B|I|BR|IR|RB|RI)\s+", "", text, flags=re.M)
    text = " ".join(text.split())
    return text[:1].lower() + text[1:]


def readme_table() -> dict[int, str]:
    section = (ROOT / "README.md").read_text().split("## Exit statuses", 1)[1].split("\n## ")[0]
    rows = re.findall(r"^\| (\d+) \| (.+?) \|$", section, flags=re.M)
    return {int(n): plain(m) for n, m in rows}


def page_table(page: str) -> dict[int, str]:
    source = (ROOT / "docs/man" / page).read_text()
    section = source.split(".SH EXIT STATUS\n", 1)[1].split("\n.SH ")[0]
    items = re.findall(r"^\.TP\n\.B (\d+)\n(.*?)(?=^\.TP|^\.PP|\Z)", section, flags=re.M | re.S)
    return {int(n): plain(text) for n, text in items}


def test_the_readme_states_every_status_and_no_other() -> None:
    statuses = {exit_status for _, exit_status in CODES.values()} | BESIDE_CODES
    assert sorted(readme_table()) == sorted(statuses)


@pytest.mark.parametrize("page", PAGES)
def test_each_man_page_states_the_readmes_table(page: str) -> None:
    readme, man = readme_table(), page_table(page)
    assert sorted(man) == sorted(readme), f"{page} lists other statuses than the README"
    for status, meaning in readme.items():
        assert man[status].startswith(meaning.rstrip(".")), (
            f"{page}, status {status}: {man[status]!r} does not say {meaning!r}"
        )


def test_the_parsers_agree() -> None:
    """The tables were found at all: a walk that finds nothing proves nothing."""
    assert len(readme_table()) == len({s for _, s in CODES.values()} | BESIDE_CODES) >= 14
    assert all(page_table(p) for p in PAGES)
