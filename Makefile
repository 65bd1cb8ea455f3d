# Developer targets; the README's two commands (scripts/serve.sh, scripts/test.sh) need no make.
.PHONY: help setup serve test test-fast lint format bench cluster-up cluster-down e2e image

help:  ## list targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-13s %s\n", $$1, $$2}'

setup:  ## create .venv and install every component (editable) and the dev tools
	bash scripts/setup.sh

serve: setup  ## serve the embedded default model on CPU at :8000
	.venv/bin/kubellm serve

test:  ## lint + the whole test suite (what CI runs)
	bash scripts/test.sh

test-fast: setup  ## the tests not marked slow
	.venv/bin/python -m pytest -m "not slow"

lint: setup  ## ruff, mypy, import-linter
	bash scripts/lint.sh

format: setup  ## apply ruff's formatting and safe fixes
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .

bench: setup  ## CPU throughput: our engine vs transformers generate
	.venv/bin/python bench/cpu_throughput.py

cluster-up: setup  ## local control plane + fake GPU nodes (kwok); prints `export KUBECONFIG=...`
	bash scripts/cluster.sh up

cluster-down:  ## stop the local control plane started by cluster-up
	bash scripts/cluster.sh down

e2e: setup  ## operator end-to-end on a real control plane (helm install, apply, scale, roll, delete)
	.venv/bin/python -m pytest e2e -v

IMAGE ?= ghcr.io/kubellm/kubellm:0.1.0
image:  ## build the container image (needs docker or podman): make image IMAGE=registry/kubellm:tag
	$(or $(shell command -v docker 2>/dev/null),$(shell command -v podman 2>/dev/null),docker) build -t $(IMAGE) .
