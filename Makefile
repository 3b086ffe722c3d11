# Thin wrappers around scripts/; `make test ARGS="-k credit"` passes arguments through.
.PHONY: setup run test lint bench

ARGS ?=

setup:
	./scripts/setup.sh

run:
	./scripts/run.sh $(ARGS)

test:
	./scripts/test.sh $(ARGS)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy

bench: setup
	.venv/bin/python -m loadtest.bench $(ARGS)
