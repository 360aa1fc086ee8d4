# Entry points for developers and CI. `make test` is exactly what CI runs (.ci/run): it
# installs what it needs (scripts/bootstrap.sh), starts a Docker engine if none runs and
# stops it again afterwards, builds the local test images, lints, and runs pytest.
# Everything is idempotent and quick once done.

SHELL := /bin/bash
.DEFAULT_GOAL := help

BIN := .venv/bin
# Two workers, a test file each at a time (its module fixtures stay on one worker): the
# tests mostly wait on containers and sockets, and every test owns its node id, ports
# and directories, so they run side by side; `PYTEST_ARGS=` runs them one by one.
PYTEST_ARGS ?= -n 2 --dist loadfile
WITH_ENGINE := bash scripts/dockerd.sh run

define lint_cmds
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict agent/
endef

.PHONY: help bootstrap images lint fmt test test-with-engine soak bench demo docker-up docker-down \
	clean distclean

help:
	@echo "make test         bootstrap, engine, test images, lint, pytest (PYTEST_ARGS=...)"
	@echo "make lint         ruff check, ruff format --check, mypy --strict agent/"
	@echo "make fmt          ruff format, ruff check --fix"
	@echo "make bootstrap    system packages and .venv (idempotent)"
	@echo "make images       build the local test images (never pulls)"
	@echo "make docker-up    start a Docker engine and leave it up; docker-down stops it"
	@echo "make soak         40 jobs under control-plane restarts and agent kills (SOAK_ARGS=...)"
	@echo "make bench        every benchmark in bench/, one table against the budgets (BENCH_ARGS=--quick)"
	@echo "make demo         one real ONNX inference job end to end (DEMO_ARGS=--keep)"
	@echo "make clean        caches; distclean also .venv and .cache"

bootstrap:
	@bash scripts/bootstrap.sh

images: bootstrap
	@$(WITH_ENGINE) bash scripts/build-test-images.sh

lint: bootstrap
	$(lint_cmds)

fmt: bootstrap
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The engine wraps the whole sub-make so that it is stopped even when a step fails, and
# make still exits with that failure.
test: bootstrap
	@$(WITH_ENGINE) $(MAKE) --no-print-directory test-with-engine

# Internal: the steps of `make test` that need the engine already up. Everything fetched
# from outside (Debian packages, the demo image's wheels, promtool) is fetched here, so
# that the tests themselves reach nothing but loopback and the docker bridge.
test-with-engine:
	@bash scripts/build-test-images.sh
	@bash scripts/build-demo-image.sh
	@bash scripts/promtool.sh >/dev/null
	$(lint_cmds)
	$(BIN)/pytest $(PYTEST_ARGS)

# Minutes, not part of `make test` (a short version runs there: tests/docker/test_soak.py).
SOAK_ARGS ?= --jobs 40 --cp-restarts 8 --agent-kills 5 --seed 1
soak: bootstrap
	@$(WITH_ENGINE) bash -c 'bash scripts/build-test-images.sh && $(BIN)/python bench/soak.py $(SOAK_ARGS)'

# A few minutes, not part of `make test` (a quick run is: tests/docker/test_bench.py).
# Figures depend on the machine, so an unmet goal is shown, not fatal (BENCH_ARGS=--strict).
BENCH_ARGS ?=
bench: bootstrap
	@$(WITH_ENGINE) bash -c 'bash scripts/build-test-images.sh && $(BIN)/python bench/run_all.py $(BENCH_ARGS)'

# One real inference job end to end (docs/demo.md): the demo image (built locally once
# per recipe, never pulled), then `cloudbender-agent demo` (DEMO_ARGS=--keep, --seed N).
DEMO_ARGS ?=
demo: bootstrap
	@$(WITH_ENGINE) bash -c 'bash scripts/build-demo-image.sh && $(BIN)/cloudbender-agent demo $(DEMO_ARGS)'

docker-up: bootstrap
	@bash scripts/dockerd.sh up

docker-down:
	@bash scripts/dockerd.sh down

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean docker-down
	rm -rf .venv .cache
