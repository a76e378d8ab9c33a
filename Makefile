# Retrace Server: 'make demo' shows it working, 'make test' proves it.
.DEFAULT_GOAL := help
VENV := .venv/bin

.PHONY: help setup demo stop test lint typecheck unit integration faults fixtures clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: ## install the system tools and the virtualenv (safe to repeat)
	@deploy/setup-host.sh

demo: setup ## bring the stack up, retrace a real crash end to end, leave it running
	@deploy/demo.sh

stop: ## stop the services the demo left running
	@deploy/stop-demo.sh

test: setup lint typecheck ## the whole suite: lint, types, unit and integration tests
	$(VENV)/pytest -p no:cacheprovider tests

BENCH_SCRIPTS := bench/retrace bench/minicore bench/slowclients bench/profile_cold

lint: ## ruff lint and format check
	$(VENV)/ruff check . $(BENCH_SCRIPTS)
	$(VENV)/ruff format --check . $(BENCH_SCRIPTS)

typecheck: ## mypy, strict
	$(VENV)/mypy
	# Scripts without .py are each a module named __main__: one mypy run apiece.
	$(VENV)/mypy bench/minicore
	$(VENV)/mypy bench/slowclients
	$(VENV)/mypy bench/profile_cold

unit: ## unit tests only
	$(VENV)/pytest tests/unit

integration: ## integration tests only (real RabbitMQ, gdb, RPM tools)
	$(VENV)/pytest -m integration tests

faults: setup ## the fault probes, longer than CI runs them, and their table (README, Reliability)
	$(VENV)/python -m tests.faults --scale 3

fixtures: ## build the sample RPMs and crash into var/fixtures
	$(VENV)/python -m tests.fixtures.build --out var/fixtures

clean: stop ## remove the demo's state and the fixture cache
	rm -rf var .cache
