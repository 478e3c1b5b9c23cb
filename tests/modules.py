"""Optional Python packages the tests need: skip without them locally, FAIL in CI.

The module counterpart of :func:`tests.conftest.require_tool` (``pytest.importorskip``
would skip in CI too, hiding a missing dev dependency).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

from tests.conftest import IN_CI


def require_module(name: str) -> ModuleType:
    """The imported module ``name``; a skip locally, a failure in CI, when it is missing."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if IN_CI:
            pytest.fail(f"{name} is required in CI (pip install -e '.[dev]')")
        pytest.skip(f"{name} is not installed")
