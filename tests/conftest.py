"""Shared fixtures: a /dev/shm leak check around every test, small schemas, the real data."""

from __future__ import annotations

import os
import pathlib

# Ray reads this once, on import: set before any test module imports ray, it makes every
# node of a test's cluster listen on 127.0.0.1 only (test_ray checks), not on the
# machine's interface address.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import pytest

import shmwriter

#: Environment variable that points the tests at another folder of dcnum's test data.
TESTDATA_ENV = "SHMWRITER_TESTDATA"
#: Where the real measurements sit next to a checkout: ``../shared/data/dcnum-testdata``.
DEFAULT_TESTDATA = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
                    / "dcnum-testdata")
_TESTDATA_ORIGIN = ("dcnum's test data, MIT licensed, from tests/data of "
                    "https://github.com/DC-analysis/dcnum")


def testdata_dir() -> pathlib.Path:
    """The folder of the zipped real measurements (``$SHMWRITER_TESTDATA`` or the default)."""
    return pathlib.Path(os.environ.get(TESTDATA_ENV) or DEFAULT_TESTDATA)


@pytest.fixture
def dcnum_testdata() -> pathlib.Path:
    """The folder of dcnum's zipped real measurements, for the tests that need them.

    When it is missing the test is skipped with a one-line reason naming the path and
    where the data come from; under CI (``$CI`` set) it fails instead: CI has the data
    and must never skip these tests silently.
    """
    folder = testdata_dir()
    if not folder.is_dir():
        problem = (f"needs the real measurements: no folder {str(folder)!r} "
                   f"({_TESTDATA_ORIGIN}; ${TESTDATA_ENV} may name another folder)")
        if os.environ.get("CI"):
            pytest.fail(f"{problem}; CI must have them, so this fails instead of skipping",
                        pytrace=False)
        pytest.skip(problem)
    return folder


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
