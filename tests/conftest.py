"""Shared fixtures. ``../shared`` (the contract and case generator) is optional: tests
that use it skip cleanly where it is absent, as in a user's clone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SHARED = ROOT.parent / "shared"

requires_shared = pytest.mark.skipif(not (SHARED / "contract").is_dir(), reason="../shared is not present")


@pytest.fixture
def example_request() -> dict[str, Any]:
    return json.loads((DATA / "example-request.json").read_text())


@pytest.fixture
def example_outcome() -> dict[str, Any]:
    return json.loads((DATA / "example-outcome.json").read_text())


def schema(name: str) -> dict[str, Any]:
    return json.loads((ROOT / "streams" / "schemas" / f"{name}.v1.schema.json").read_text())
