"""Shared fixtures: a /dev/shm leak check around every test, and small schemas."""

from __future__ import annotations

import os

import pytest

import shmwriter


def _own_segments() -> set[str]:
    """Segments in /dev/shm owned by this process (the name holds the owner pid)."""
    prefix = f"shmw_{os.getpid()}_"
    return {name for name in os.listdir("/dev/shm") if name.startswith(prefix)}


@pytest.fixture(autouse=True)
def no_leaked_segments():
    """Fail a test that leaves a segment of this process in /dev/shm."""
    before = _own_segments()
    yield
    leaked = _own_segments() - before
    assert not leaked, f"segments left in /dev/shm: {sorted(leaked)}"


@pytest.fixture
def small_schema() -> shmwriter.Schema:
    return shmwriter.Schema({
        "image": shmwriter.Feature("uint8", (8, 10)),
        "mask": shmwriter.Feature("bool", (8, 10)),
        "deform": shmwriter.Feature("float32"),
        "area": shmwriter.Feature("int64"),
    })
