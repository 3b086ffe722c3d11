#!/usr/bin/env bash
# Prepare a checkout of streamgate: system packages, a Python 3.11-3.13 virtualenv in .venv and an
# editable install of the project with its dev extras.
#
# Idempotent and quick when everything is already in place: it only installs what is missing and
# re-runs `pip install` only when pyproject.toml is newer than the stamp file in .venv.
# Works from any current directory. Used by scripts/run.sh, scripts/test.sh and the Makefile.
#
# Environment:
#   STREAMGATE_PYTHON   interpreter to build the virtualenv with (any of 3.11, 3.12, 3.13; default:
#                       the first of python3.11, python3.12, python3.13, python3 that is one). A
#                       value that is not a supported Python is an error, never silently skipped;
#                       a virtualenv built by another interpreter is rebuilt.
#   STREAMGATE_VENV     where the virtualenv lives (default: .venv in the checkout), so several
#                       Python versions can sit side by side (CI runs the unit tests on 3.13 too)
#   STREAMGATE_SKIP_SYSTEM_PACKAGES=1   do not check Debian packages (non-Debian machines, CI images)
#   STREAMGATE_PIPECAT_VENV   where the Pipecat test client's virtualenv lives (default: .venv-pipecat)
#   STREAMGATE_NATIVE=0 do not compile the hot path (and run it as pure Python: docs/native.md)
set -euo pipefail

# System packages the server and its tests need (Debian/Ubuntu names). Python itself is handled
# separately below because the package name depends on the distribution.
SYSTEM_PACKAGES="espeak-ng redis-server postgresql tesseract-ocr tesseract-ocr-eng tesseract-ocr-hin poppler-utils fonts-dejavu-core fonts-lohit-deva libfribidi0 haproxy"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="${STREAMGATE_VENV:-$ROOT/.venv}"
STAMP="$VENV/.streamgate-installed"

log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

SUPPORTED="3.11 3.12 3.13"

# Prints "3.N" for a supported interpreter, nothing (and fails) for anything else.
supported_version() {
    "$1" -c 'import sys; v = "%d.%d" % sys.version_info[:2]; print(v); sys.exit(0 if v in sys.argv[1].split() else 1)' "$SUPPORTED" 2>/dev/null
}

has_venv_module() {
    # Debian splits venv/ensurepip into python3.N-venv; without it `python -m venv` fails.
    "$1" -c 'import venv, ensurepip' >/dev/null 2>&1
}

# A Python asked for by name must be used or refused, never silently replaced by another one.
check_requested_python() {
    [[ -n "${STREAMGATE_PYTHON:-}" ]] || return 0
    command -v "$STREAMGATE_PYTHON" >/dev/null 2>&1 \
        || die "STREAMGATE_PYTHON=$STREAMGATE_PYTHON: no such interpreter"
    supported_version "$STREAMGATE_PYTHON" >/dev/null \
        || die "STREAMGATE_PYTHON=$STREAMGATE_PYTHON is not Python ${SUPPORTED// /, }"
}

find_python() {
    local candidate
    if [[ -n "${STREAMGATE_PYTHON:-}" ]]; then
        command -v "$STREAMGATE_PYTHON"  # checked by check_requested_python
        return 0
    fi
    for candidate in python3.11 python3.12 python3.13 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && supported_version "$candidate" >/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

package_present() {
    # A package counts as present if dpkg knows it or a command of that name exists (covers
    # machines where the tool was installed some other way).
    dpkg -s "$1" >/dev/null 2>&1 || command -v "$1" >/dev/null 2>&1
}

# --- system packages ----------------------------------------------------------------------------
missing=()
check_requested_python
PYTHON="$(find_python)" || PYTHON=""
if [[ -z "$PYTHON" ]]; then
    missing+=(python3 python3-venv)
elif ! has_venv_module "$PYTHON" && [[ ! -x "$VENV/bin/python" ]]; then
    missing+=("python$(supported_version "$PYTHON")-venv")
fi
if [[ "${STREAMGATE_SKIP_SYSTEM_PACKAGES:-0}" != 1 ]]; then
    for pkg in $SYSTEM_PACKAGES; do
        package_present "$pkg" || missing+=("$pkg")
    done
fi

if ((${#missing[@]})); then
    if ! command -v apt-get >/dev/null 2>&1; then
        die "missing system packages: ${missing[*]} (no apt-get here: install them with your" \
            "package manager, or set STREAMGATE_SKIP_SYSTEM_PACKAGES=1 if they are elsewhere)"
    fi
    if [[ "$(id -u)" -ne 0 ]]; then
        log "missing system packages: ${missing[*]}"
        log "install them with:"
        printf '\n    sudo apt-get install -y --no-install-recommends %s\n\n' "${missing[*]}" >&2
        log "then run this script again."
        exit 1
    fi
    log "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    PYTHON="$(find_python)" || PYTHON=""
fi

if [[ -z "$PYTHON" ]]; then
    die "no Python $SUPPORTED interpreter found (tried python3.11, python3.12, python3.13 and" \
        "python3). Install one (distribution package, deadsnakes PPA or pyenv) or point" \
        "STREAMGATE_PYTHON at one."
fi

# --- virtualenv -----------------------------------------------------------------------------------
WANT="$(supported_version "$PYTHON")"
if [[ -x "$VENV/bin/python" ]] && [[ "$(supported_version "$VENV/bin/python" || true)" != "$WANT" ]]; then
    # A venv from another interpreter (or one whose interpreter has gone away): rebuild it.
    log "$VENV does not run Python $WANT ($PYTHON); recreating it"
    rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
    rm -f "$STAMP"
fi

# --- project install ------------------------------------------------------------------------------
if [[ ! -f "$STAMP" || "$ROOT/pyproject.toml" -nt "$STAMP" ]]; then
    log "installing streamgate and its dev dependencies into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev,load]"
    touch "$STAMP"
fi

# --- the compiled hot path (docs/native.md) -------------------------------------------------------
# mypyc compiles the listed hot-path modules into .build/native/<python-tag>/ (about two minutes
# the first time, seconds when nothing changed: it compares source hashes). No C compiler or no
# Python headers: one line saying so, and the server runs the same modules as pure Python.
"$VENV/bin/python" "$ROOT/scripts/build_native.py" \
    || log "compiling the hot path failed; the server runs it as pure Python"

# --- Pipecat, the client of tests/e2e/test_pipecat_services.py ------------------------------------
# A virtualenv of its own: every Pipecat release pins soxr and soundfile versions that would
# replace the server's own (docs/decisions/14G1-pipecat-client-venv.md). Only for the tests
# (scripts/test.sh asks for it): running the server never downloads Pipecat's ~540 MB.
if [[ "${STREAMGATE_TEST_CLIENTS:-0}" != "1" ]]; then
    exit 0
fi
PIPECAT_VENV="${STREAMGATE_PIPECAT_VENV:-$ROOT/.venv-pipecat}"
PIPECAT_REQUIREMENTS="$ROOT/tests/e2e/pipecat-requirements.txt"
if ! "$PIPECAT_VENV/bin/python" -c '' >/dev/null 2>&1; then
    rm -rf "$PIPECAT_VENV"  # none yet, or its interpreter has gone away
    log "creating $PIPECAT_VENV with $PYTHON"
    "$PYTHON" -m venv "$PIPECAT_VENV"
fi
if [[ ! -f "$PIPECAT_VENV/.streamgate-installed" \
      || "$PIPECAT_REQUIREMENTS" -nt "$PIPECAT_VENV/.streamgate-installed" ]]; then
    log "installing Pipecat (a test client) into $PIPECAT_VENV"
    "$PIPECAT_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r "$PIPECAT_REQUIREMENTS"
    touch "$PIPECAT_VENV/.streamgate-installed"
fi
