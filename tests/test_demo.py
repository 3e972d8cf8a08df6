"""The demo command: a real run through the console script, checked with h5py and dclab."""

from __future__ import annotations

import re

import h5py
import numpy as np
from _cli_workers import shmwriter_cli
from dclab.rtdc_dataset import check_dataset

from shmwriter.ops.demo import DEMO_SCHEMA, demo_events


def test_demo_command_writes_a_valid_measurement(tmp_path):
    path = tmp_path / "demo.rtdc"
    result = shmwriter_cli("demo", "--frames", "300", "--producers", "2", "--output", str(path),
                           timeout=120)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    match = re.fullmatch(r"(\d+) events, [\d.]+ MB of event data \([\d.]+ MB on disk\) in "
                         r"[\d.]+ s: [\d.]+ MB/s, peak memory \d+ MB -> (.+)", line)
    assert match, line
    assert match.group(2) == str(path)
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    expected = [demo_events(i) for i in range(300)]
    nevents = sum(len(e["deform"]) for e in expected if e is not None)
    assert int(match.group(1)) == nevents
    with h5py.File(path) as h5:
        events = h5["events"]
        assert set(events) == {*DEMO_SCHEMA, "frame", "nevents"}
        images = np.concatenate([e["image"] for e in expected if e is not None])
        np.testing.assert_array_equal(events["image"][:], images)
    violations, alerts, _ = check_dataset(str(path))
    assert (violations, alerts) == ([], [])


def test_demo_user_mistakes_are_one_line(tmp_path):
    result = shmwriter_cli("demo", "--frames", "-3")
    assert result.returncode == 2
    assert "expected a positive integer; got '-3'" in result.stderr
    assert "Traceback" not in result.stderr
    result = shmwriter_cli("demo", "--output", str(tmp_path / "no" / "x.rtdc"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_help_has_examples():
    result = shmwriter_cli("demo", "--help")
    assert result.returncode == 0
    assert "examples:" in result.stdout
