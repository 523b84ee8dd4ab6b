# qusd: `make run` and `make test` set everything up themselves on Debian.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CACHE  := .cache
FOREIGN := $(CACHE)/foreign
export QUSD_FOREIGN_DIR := $(abspath $(FOREIGN))

.PHONY: all setup test test-unit lint run clean deb

all: test

# Debian packages (qemu-user-static, libsystemd-dev, ...): checked once, then
# again only when the script changes.
$(CACHE)/system.stamp: tools/setup-system.sh
	PYTHON=$(PYTHON) sh tools/setup-system.sh
	@mkdir -p $(CACHE) && touch $@

$(BIN)/python: | $(CACHE)/system.stamp
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml $(BIN)/python $(CACHE)/system.stamp
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

# Debian's busybox-static for each foreign architecture the tests run.
$(FOREIGN)/.stamp: tools/fetch-foreign.sh
	sh tools/fetch-foreign.sh $(FOREIGN)
	@touch $@

# The Debian package (packaging/debian: debhelper + dh-virtualenv), built in
# build/deb/qusd-VERSION/ and put in dist/. A file target: rebuilt only when
# something that goes into it changes. As root, installs its Build-Depends.
DEB := $(shell sh packaging/build-deb.sh --print-deb)
DEB_INPUTS := pyproject.toml README.md packaging/qusd.toml packaging/build-deb.sh \
	packaging/constraints.txt packaging/maintainer.env \
	$(wildcard systemd/qusd.*) $(wildcard docs/man/*) \
	$(shell find qusd packaging/debian -name __pycache__ -prune -o ! -type d -print)

$(DEB): $(DEB_INPUTS)
	sh packaging/build-deb.sh

deb: $(DEB)

setup: $(VENV)/.installed $(FOREIGN)/.stamp

# Lint first (fail fast), then the fast unit layer, then the whole suite,
# which checks the package too, so `make test` builds it (once).
test: setup $(DEB)
	$(MAKE) --no-print-directory lint test-unit
	QUSD_NO_SKIPS=1 $(BIN)/python -m pytest --ignore=tests/unit $(PYTEST_ARGS)

# The unit layer alone: the service and the API in-process on a fake kernel.
# Needs no root and no binfmt_misc; seconds.
test-unit: $(VENV)/.installed
	QUSD_NO_SKIPS=1 $(BIN)/python -m pytest -q tests/unit

# The daemon in a sandbox with its own binfmt_misc; socket and state in ./run.
run: setup
	@sh tools/run.sh

lint: $(VENV)/.installed
	$(BIN)/ruff check qusd tests bench
	$(BIN)/ruff format --check qusd tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(CACHE) run .pytest_cache .mypy_cache .ruff_cache .hypothesis
	rm -rf build/deb $(DEB)
