# Thin wrappers around scripts/; `make test ARGS="-k credit"` passes arguments through.
.PHONY: setup native run test lint bench hostile eval-vision

ARGS ?=

setup:
	./scripts/setup.sh

# Recompile the hot path with mypyc even if up to date (setup does it when a source changed).
native: setup
	.venv/bin/python scripts/build_native.py --force -v

run:
	./scripts/run.sh $(ARGS)

test:
	./scripts/test.sh $(ARGS)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy

# Hostile-input suite, randomly seeded, HOSTILE_EXAMPLES examples per test (docs/testing.md).
HOSTILE_EXAMPLES ?= 2000
hostile: setup
	STREAMGATE_HOSTILE_EXAMPLES=$(HOSTILE_EXAMPLES) ./scripts/test.sh tests/hostile $(ARGS)

# The bench's Pipecat peer (issue 15) runs from a bench-only virtualenv, built here once.
bench: setup
	./loadtest/pipecat_peer/setup.sh
	.venv/bin/python -m loadtest.bench $(ARGS)

# Vision evaluation (issue 16): corpus -> scan-like copies -> /v1/vision/extract on a real server
# -> docs/vision-eval.md. `make eval-vision ARGS="--label after"` names the run in its history.
eval-vision: setup
	.venv/bin/python -m eval.vision.run $(ARGS)
