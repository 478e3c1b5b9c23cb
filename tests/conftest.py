"""Shared fixtures: where the public vectors are, and tools that must exist in CI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT.parent / "shared" / "vectors"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """Path of an external program; skip without it locally, fail in CI."""
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is required in CI but is not installed (.ci/run installs it)")
        pytest.skip(f"{name} is not installed")
    return path


@pytest.fixture
def vectors() -> Path:
    """``../shared/vectors`` (public third-party test data; never copied into the repo)."""
    if not VECTORS.is_dir():
        if IN_CI:
            pytest.fail(f"{VECTORS} is missing in CI")
        pytest.skip(f"public vectors not present at {VECTORS}")
    return VECTORS


@pytest.fixture
def openssl() -> str:
    return require_tool("openssl")


@pytest.fixture
def gpgsm() -> str:
    return require_tool("gpgsm")
