#!/usr/bin/env bash
# Set up the checkout if needed (scripts/setup.sh), then run the test suite from the repository
# root. Extra arguments go to pytest (paths relative to the repository root), e.g.
#   ./scripts/test.sh tests/unit -k credit
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The tests' own clients (Pipecat, in a virtualenv of its own) too, unless told not to.
STREAMGATE_TEST_CLIENTS="${STREAMGATE_TEST_CLIENTS:-1}" "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "${STREAMGATE_VENV:-$ROOT/.venv}/bin/pytest" -q "$@"
