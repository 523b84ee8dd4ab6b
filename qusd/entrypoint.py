"""The container image's entrypoint: one image for every spelling.

`docker run IMAGE register aarch64` (qusd-binfmt's commands),
`docker run IMAGE -s -- -p aarch64` (qus' register.sh),
`docker run IMAGE --install arm64` (tonistiigi/binfmt) and
`docker run IMAGE --reset -p yes` (multiarch/qemu-user-static) all work:
the first argument says which command line it is. Standard library only.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from qusd import oneshot, qus

#: multiarch/qemu-user-static's image: its register.sh runs
#: `qemu-binfmt-conf.sh --qemu-suffix -static --qemu-path /usr/bin "$@"`,
#: after removing every qemu-* entry when the first argument is --reset.
MULTIARCH_FIRST = frozenset(
    {"--reset", "-p", "--persistent", "-c", "--credential", "--qemu-path", "--qemu-suffix",
     "--preserve-argv0", "--debian", "--systemd", "--exportdir"}
)  # fmt: skip


#: qusd-binfmt's own options that may come first (tonistiigi/binfmt's too)
ONESHOT_OPTIONS = frozenset(
    {"--json", "--version", "--install", "--uninstall", "--mount", "--binfmt-path"}
)


def command_line(argv: Sequence[str]) -> tuple[str, list[str]]:
    """Which command a command line is for ("qusd-binfmt" or "qus-register"),
    and its arguments in that command's terms."""
    args = list(argv)
    first = args[0] if args else ""
    if first in MULTIARCH_FIRST and "--" not in args:
        reset = ["-r"] if first == "--reset" else []
        rest = args[1:] if reset else args
        return "qus-register", [*reset, "-s", "--", "-Q", "/usr/bin", *rest]
    if first.startswith("-") and first.split("=")[0] not in ONESHOT_OPTIONS:
        return "qus-register", args  # register.sh's options (and -h, --help)
    return "qusd-binfmt", args


def main(argv: Sequence[str] | None = None) -> int:
    which, args = command_line(sys.argv[1:] if argv is None else argv)
    return qus.main(args) if which == "qus-register" else oneshot.main(args)


if __name__ == "__main__":
    sys.exit(main())
