# SRE targets: thin wrappers around the real commands (docs/acceptance.md says what each proves).
# Lab targets need root. Typical session:
#   make lab-up deploy infra acceptance      # then: make faults / make load; finally make lab-down

PY      ?= .venv/bin/python
PYTEST  ?= $(PY) -m pytest
PYINFRA ?= .venv/bin/pyinfra
# make load MESSAGES=5000 CONNECTIONS=24
MESSAGES    ?= 3000
CONNECTIONS ?= 16

.PHONY: help test lab-up keys deploy infra acceptance faults load lab-down ci

help:
	@echo "make test        unit + integration tests (real daemons on loopback, no lab)"
	@echo "make lab-up      python -m lab up: the lab fleet on this machine (root)"
	@echo "make keys        python -m deploykit dkim-keys inventories/lab.py (missing DKIM keys)"
	@echo "make deploy      make keys, then pyinfra inventories/lab.py deploy.py -y"
	@echo "make infra       pytest tests/infra (testinfra) + the lab tests of tests/integration"
	@echo "make acceptance  pytest tests/acceptance (mechanisms, bad input, load, faults)"
	@echo "make faults      only the fault tests of the acceptance suite"
	@echo "make load        bench/fleet: MESSAGES=$(MESSAGES) mixed messages through the fleet"
	@echo "make lab-down    python -m lab down"
	@echo "make ci          bash .ci/run (everything, as CI runs it)"

test:
	$(PYTEST) -ra -m "not lab" tests/unit tests/integration

lab-up:
	$(PY) -m lab up

keys:
	$(PY) -m deploykit dkim-keys inventories/lab.py

deploy: keys
	$(PYINFRA) inventories/lab.py deploy.py -y

infra:
	$(PYTEST) -ra tests/infra
	$(PYTEST) -ra -m lab tests/integration

acceptance:
	$(PYTEST) -ra tests/acceptance

faults:
	$(PYTEST) -ra tests/acceptance/test_faults.py

load:
	$(PY) -m bench.fleet.load --messages $(MESSAGES) --connections $(CONNECTIONS)

lab-down:
	$(PY) -m lab down

ci:
	bash .ci/run
