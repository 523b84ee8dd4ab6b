#!/bin/sh
# Write packaging/constraints.txt: the exact version of every Python
# distribution the Debian package's virtualenv is built with (qusd's runtime
# dependencies, and what builds qusd and systemd-python: setuptools), as
# Debian's python3 resolves pyproject.toml's ranges against PyPI today.
# packaging/debian/rules builds with these pins only (PIP_CONSTRAINT), so two
# builds of one commit bundle the same versions; pyproject.toml keeps its
# ranges for development. Run it to move the pins, then `make deb`.
#
#   sh packaging/pin-deps.sh
set -eu
cd "$(dirname "$0")/.."
out=packaging/constraints.txt
python=/usr/bin/python3

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM
# No pins of the caller's and no cache: resolve as a fresh build would.
unset PIP_CONSTRAINT PIP_BUILD_CONSTRAINT VIRTUAL_ENV PYTHONPATH PYTHONHOME
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

"$python" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip
# The newest of everything pyproject.toml allows, and setuptools (the build
# backend of qusd and of systemd-python's sdist); pip itself, which builds;
# shtab, which writes the shell completion at build time.
# --dry-run: what would be installed, nothing is.
cp -R pyproject.toml README.md qusd "$tmp/"
find "$tmp/qusd" -name __pycache__ -prune -exec rm -rf {} +
(cd "$tmp" && ./venv/bin/python -m pip install -q --dry-run --ignore-installed \
    --report report.json . setuptools pip shtab)

"$tmp/venv/bin/python" - "$tmp/report.json" "$out" "$("$python" -V)" <<'EOF'
import json, sys
report, out, python = sys.argv[1:]
pins = sorted(
    (item["metadata"]["name"].lower().replace("_", "-"), item["metadata"]["version"])
    for item in json.load(open(report))["install"]
    if item["metadata"]["name"] != "qusd"
)
with open(out, "w") as f:
    f.write(
        "# The versions the Debian package bundles and builds with, written by\n"
        f"# packaging/pin-deps.sh for Debian's {python} (do not edit: run it).\n"
    )
    f.writelines(f"{name}=={version}\n" for name, version in pins)
EOF
echo "pin-deps: $out"
cat "$out"
