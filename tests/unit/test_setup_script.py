"""scripts/setup.sh picks a supported Python (3.11-3.13), never silently another than asked for."""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "scripts" / "setup.sh"


def _run_setup(tmp_path: Path, python: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "STREAMGATE_PYTHON": python,
        "STREAMGATE_VENV": str(tmp_path / "venv"),
        "STREAMGATE_SKIP_SYSTEM_PACKAGES": "1",
    }
    return subprocess.run(["bash", str(SETUP)], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def _fake_python(tmp_path: Path, version: str) -> Path:
    """An interpreter stand-in that answers the version probe as Python `version` would."""
    fake = tmp_path / f"python{version}"
    # $3 is setup.sh's list of supported versions; `-m venv` fails like a Python without venv.
    fake.write_text(
        "#!/bin/sh\n"
        'case "$2" in *ensurepip*) exit 0 ;; esac\n'
        '[ "$1" = -m ] && exit 1\n'
        f"echo {version}\n"
        f'case " $3 " in *" {version} "*) exit 0 ;; esac\n'
        "exit 1\n")
    fake.chmod(0o755)
    return fake


def test_requires_python_admits_3_11_to_3_13() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    spec = SpecifierSet(project["requires-python"])
    assert [v for v in ("3.10", "3.11", "3.12", "3.13", "3.14") if v in spec] == [
        "3.11", "3.12", "3.13"]


def test_unsupported_requested_python_is_refused_not_ignored(tmp_path: Path) -> None:
    result = _run_setup(tmp_path, str(_fake_python(tmp_path, "3.10")))
    assert result.returncode == 1
    assert "is not Python 3.11, 3.12, 3.13" in result.stderr
    assert not (tmp_path / "venv").exists()


def test_missing_requested_python_is_refused(tmp_path: Path) -> None:
    result = _run_setup(tmp_path, str(tmp_path / "no-such-python"))
    assert result.returncode == 1
    assert "no such interpreter" in result.stderr
    assert not (tmp_path / "venv").exists()


def test_supported_requested_python_is_used(tmp_path: Path) -> None:
    """The probe accepts 3.12 (venv creation is where a fake stops: the choice is what counts)."""
    result = _run_setup(tmp_path, str(_fake_python(tmp_path, "3.12")))
    assert "is not Python" not in result.stderr
    assert f"creating {tmp_path / 'venv'} with {tmp_path / 'python3.12'}" in result.stderr
