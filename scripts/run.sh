#!/usr/bin/env bash
# Set up the checkout if needed (scripts/setup.sh), then start the server with the embedded
# defaults (config/default.toml). Extra arguments go to `streamgate serve`, e.g.
#   ./scripts/run.sh --config my.toml
# The working directory is left as it is, so relative paths in arguments keep working.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
exec "${STREAMGATE_VENV:-$ROOT/.venv}/bin/streamgate" serve "$@"
