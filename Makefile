# qusd: `make run` and `make test` set everything up themselves on Debian.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CACHE  := .cache
FOREIGN := $(CACHE)/foreign
export QUSD_FOREIGN_DIR := $(abspath $(FOREIGN))

.PHONY: all setup test test-unit test-vm lint run clean deb bench

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
	packaging/constraints.txt packaging/maintainer.env packaging/completions.sh \
	$(wildcard systemd/qusd.*) $(wildcard docs/man/*) $(wildcard packaging/oci/*) \
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

# The boot path in a real Debian 12 (tools/vm, tests/test_vm.py): the package
# installed with apt-get, two boots under qemu-system-x86_64 -accel tcg, the
# promises of README's "Running under systemd" checked inside, one result per
# step. The base image is built once per version of tools/vm/image.sh, in
# /var/cache/qusd-test/vm; `make test` runs this too.
test-vm: setup $(DEB)
	$(BIN)/python -m pytest tests/test_vm.py $(PYTEST_ARGS)
	@grep -ah '^qusd-vm: end' build/vm/report-*.log | tr -d '\r'

# The daemon in a sandbox with its own binfmt_misc; socket and state in ./run.
run: setup
	@sh tools/run.sh

# The benchmarks (bench/, figures in bench/RESULTS.md): each measures qusd
# against its baseline, alternately, in one run; minutes, not part of `make
# test`. Sandboxes only: the host's binfmt_misc table is never touched.
BENCHES := listing health memory growth register large_table startup restore
bench: setup
	@for b in $(BENCHES); do echo "== bench/$$b.py"; $(BIN)/python -m bench.$$b || exit 1; done

lint: $(VENV)/.installed
	$(BIN)/ruff check qusd tests bench
	$(BIN)/ruff format --check qusd tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(CACHE) run .pytest_cache .mypy_cache .ruff_cache .hypothesis
	rm -rf build/deb build/vm $(DEB)
