"""System programs and libraries the tests need, all installed by scripts/setup.sh: a missing one
fails the test that needs it, saying how to get it, as tests/speech.py does for espeak-ng. A
skip would hide a broken setup behind a green run."""

from __future__ import annotations

import shutil

import pytest


def require_programs(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run ./scripts/setup.sh (it installs "
                    "the Debian packages the tests need)")


def require_pillow_feature(feature: str, why: str) -> None:
    from PIL import features

    if not features.check(feature):
        pytest.fail(f"Pillow has no {feature} here ({why}): run ./scripts/setup.sh")
