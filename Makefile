# Everything runs from the virtualenv that scripts/setup creates.
VENV   ?= .venv
PYTHON ?= $(VENV)/bin/python

.PHONY: setup test test-frr test-fast lint golden guest demo bench bench-quick bench-frr clean

setup:
	./scripts/setup

# The whole suite: pure tests, linters, real QEMU (-S), real guests under TCG (the FRR lab
# among them), netem inside the Debian image and qlinkd under systemd in a container.
test:
	$(PYTHON) -m pytest -q

# The FRR lab alone (5-10 min on 2 cores): up, BGP, a spine restart, a reboot inside a spine,
# a day-0 change to a leaf.
test-frr:
	guest/build-image
	$(PYTHON) -m pytest -q -s -m frr

# Pure tier and linters only: seconds, no QEMU.
test-fast:
	$(PYTHON) -m pytest -q --ignore=tests/qemu --ignore=tests/guest

lint:
	$(PYTHON) -m ruff check qlink labdriver tests bench
	$(PYTHON) -m ruff format --check qlink labdriver tests bench
	$(PYTHON) -m mypy --strict qlink labdriver tests bench

# Regenerate the golden plans after a deliberate change; review the diff like code.
golden:
	$(PYTHON) -m tests.golden

guest:
	guest/build-guest

# The CLOS lab end to end: up, LLDP everywhere, restart spine1, peers untouched, down.
demo:
	$(PYTHON) -m labdriver.demo

# qlink against the physical limit; writes BENCHMARKS.md and bench/bringup.png (~23 min on 2 cores).
bench:
	$(PYTHON) -m bench

bench-quick:
	$(PYTHON) -m bench --quick

# The FRR lab's figures (boot to ready, convergence, loss during a spine's restart and its own
# reboot) into BENCHMARKS.md's "Real routing lab" section; the rest of the report stays.
bench-frr:
	guest/build-image
	QLINK_FRR_FIGURES=$(CURDIR)/.frr-figures.json $(PYTHON) -m pytest -q -s -m frr
	$(PYTHON) -m bench.frr .frr-figures.json --output BENCHMARKS.md
	rm -f .frr-figures.json

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
