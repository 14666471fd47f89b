"""Shared fixtures: the repository root, and a guard that no test leaks shm segments."""

from __future__ import annotations

from pathlib import Path

import pytest

from topocoll.comm.transports.shm import stale_segments

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture
def no_leaked_segments():
    """Fails the test if it leaves topocoll shared-memory segments behind."""
    before = set(stale_segments())
    yield
    leaked = set(stale_segments()) - before
    for path in leaked:
        path.unlink(missing_ok=True)
    assert not leaked, f"test left shared-memory segments behind: {sorted(map(str, leaked))}"
