#!/usr/bin/env bash
# The bench-only virtualenv of the Pipecat peer (`make bench`; docs/decisions/15P1):
# .venv-bench-pipecat (or $STREAMGATE_BENCH_PIPECAT_VENV) with the pinned
# loadtest/pipecat_peer/requirements.txt. Idempotent: pip runs again only when the requirements
# file is newer than the stamp. Built with the interpreter of the server's .venv (same Python).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${STREAMGATE_BENCH_PIPECAT_VENV:-$ROOT/.venv-bench-pipecat}"
REQUIREMENTS="$ROOT/loadtest/pipecat_peer/requirements.txt"
PYTHON="${STREAMGATE_PYTHON:-$ROOT/.venv/bin/python}"
log() { printf 'bench-pipecat: %s\n' "$*" >&2; }

if ! "$VENV/bin/python" -c '' >/dev/null 2>&1; then
    rm -rf "$VENV"  # none yet, or its interpreter has gone away
    base="$("$PYTHON" -c 'import sys; print(sys._base_executable)')"
    log "creating $VENV with $base"
    "$base" -m venv "$VENV"
fi
if [[ ! -f "$VENV/.streamgate-installed" || "$REQUIREMENTS" -nt "$VENV/.streamgate-installed" ]]; then
    log "installing Pipecat (the bench's peer) into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
    touch "$VENV/.streamgate-installed"
fi
