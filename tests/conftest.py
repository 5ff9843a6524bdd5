"""Shared fixtures: the built-in catalog and the reference-data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.catalog.loader import load_catalog
from service.planning.catalog import Catalog

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    path = Path(os.environ.get("SPLAN_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
    if not (path / "h100_sxm_gemm.csv").exists():
        pytest.skip(f"reference data not found at {path}")
    return path
