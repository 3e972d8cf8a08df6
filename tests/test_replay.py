"""Replay of real measurements (dcnum's test data): the output equals the input, event for event."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import zipfile

import dclab
import h5py
import numpy as np
import pytest
from _cli_workers import shmwriter_cli

from shmwriter.ops.replay import ReplayInputError, ReplayPlan, replay

#: The zip files of dcnum's test data that the tests replay (fixture ``dcnum_testdata``).
MEASUREMENTS = ("fmt-hdf5_cytoshot_full-features_2023", "fmt-hdf5_cytoshot_full-features_2024",
                "fmt-hdf5_shapein_raw-with-variable-length-logs")


def unzip(archive: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
    with zipfile.ZipFile(archive) as zf:
        names = [n for n in zf.namelist() if n.endswith(".rtdc")]
        assert len(names) == 1, names
        zf.extract(names[0], folder)
    return folder / names[0]


def log_lines(dataset: h5py.Dataset) -> list[str]:
    return [line.decode() if isinstance(line, bytes) else str(line) for line in dataset[:]]


def assert_same_measurement(path_out: pathlib.Path, path_in: pathlib.Path) -> None:
    """Every feature equal event for event (bytes, dtype, shape), attributes, logs, tables."""
    with h5py.File(path_in, "r") as src, h5py.File(path_out, "r") as dst:
        assert sorted(dst["events"]) == sorted(src["events"])
        for name, dataset in src["events"].items():
            ours = dst["events"][name]
            assert (ours.dtype, ours.shape) == (dataset.dtype, dataset.shape), name
            assert ours[()].tobytes() == dataset[()].tobytes(), name
        for key, value in src.attrs.items():
            assert type(dst.attrs[key]) is type(value), key
            assert np.array_equal(dst.attrs[key], value), key
        extra = set(dst.get("logs", {})) - set(src.get("logs", {}))
        assert all(name.startswith("shmwriter-") for name in extra), extra  # the writer's own
        for name in src.get("logs", {}):
            assert log_lines(dst["logs"][name]) == log_lines(src["logs"][name]), name
        assert sorted(dst.get("tables", {})) == sorted(src.get("tables", {}))
        for name in src.get("tables", {}):
            table = src["tables"][name]
            assert dst["tables"][name].dtype == table.dtype
            assert dst["tables"][name][()].tobytes() == table[()].tobytes(), name


def test_the_three_measurements_are_there(dcnum_testdata):
    found = sorted(path.stem for path in dcnum_testdata.glob("*.zip"))
    assert found == sorted(MEASUREMENTS), f"expected dcnum's test data in {dcnum_testdata}"


@pytest.mark.parametrize("name", MEASUREMENTS)
def test_replay_reproduces_the_measurement(tmp_path, dcnum_testdata, name):
    path_in = unzip(dcnum_testdata / f"{name}.zip", tmp_path)
    path_out = tmp_path / "replayed.rtdc"
    plan = ReplayPlan.from_file(path_in)
    seen = []
    summary = replay(plan, path_out, producers=2, seed=3,
                     progress=lambda done, total: seen.append((done, total)))
    assert (summary.frames, summary.events) == (plan.frames, plan.events)
    assert seen[-1] == (plan.frames, plan.frames)
    assert_same_measurement(path_out, path_in)
    with dclab.new_dataset(path_out) as ds, dclab.new_dataset(path_in) as ds_in:
        assert len(ds) == len(ds_in) == plan.events
        assert sorted(ds.features_innate) == sorted(ds_in.features_innate)
        np.testing.assert_array_equal(ds["frame"], ds_in["frame"])
        assert ds.config["experiment"]["event count"] == plan.events


def test_frames_are_runs_of_the_frame_feature(tmp_path, dcnum_testdata):
    path_in = unzip(dcnum_testdata / "fmt-hdf5_cytoshot_full-features_2024.zip", tmp_path)
    plan = ReplayPlan.from_file(path_in)
    with h5py.File(path_in, "r") as h5:
        frame = h5["events/frame"][:]
    assert plan.bounds[0] == 0 and plan.bounds[-1] == len(frame) == plan.events
    for start, stop in zip(plan.bounds[:-1], plan.bounds[1:], strict=True):
        assert (frame[start:stop] == frame[start]).all()
    assert plan.frames == len(np.unique(frame))  # sorted input: one run per frame value
    assert "shmwriter_replay_nevents" in plan.schema and "nevents" not in plan.schema


def test_replay_command_in_a_subprocess(tmp_path, dcnum_testdata):
    path_in = unzip(dcnum_testdata / "fmt-hdf5_shapein_raw-with-variable-length-logs.zip",
                    tmp_path)
    path_out = tmp_path / "out.rtdc"
    result = shmwriter_cli("replay", str(path_in), str(path_out), "--producers", "3", "--quiet",
                           timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert re.fullmatch(rf"20 events in 20 frames replayed by 3 producer\(s\) in [\d.]+ s -> "
                        rf"{re.escape(str(path_out))}", result.stdout.strip()), result.stdout
    assert_same_measurement(path_out, path_in)


@pytest.mark.parametrize(("setup", "message"), [
    ("missing", "shmwriter replay: error: no such file: "),
    ("not-hdf5", "is not an HDF5 (.rtdc) file"),
    ("no-frame", "has no 'frame' feature; replay groups the events into frames by it"),
])
def test_replay_command_user_mistakes_are_one_line(tmp_path, setup, message):
    path_in = tmp_path / "in.rtdc"
    if setup == "not-hdf5":
        path_in.write_text("hello")
    elif setup == "no-frame":
        with h5py.File(path_in, "w") as h5:
            h5["events/deform"] = np.ones(3)
    result = shmwriter_cli("replay", str(path_in), str(tmp_path / "out.rtdc"))
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_replay_refuses_to_overwrite_its_input(tmp_path, dcnum_testdata):
    path_in = unzip(dcnum_testdata / f"{MEASUREMENTS[0]}.zip", tmp_path)
    with pytest.raises(ReplayInputError, match="is the input file; choose another path"):
        replay(path_in, path_in)
    with pytest.raises(ValueError, match="producers must be a positive int; got 0"):
        replay(path_in, tmp_path / "out.rtdc", producers=0)



#: The tests above that need the real measurements.
DATA_TESTS = 7


@pytest.mark.parametrize(("ci", "outcome", "summary"), [
    ("", "skipped", f"3 passed, {DATA_TESTS} skipped, 2 deselected in "),
    ("true", "errors", f"3 passed, 2 deselected, {DATA_TESTS} errors in "),
], ids=["here", "ci"])
def test_missing_data_skip_here_and_fail_on_ci(tmp_path, ci, outcome, summary):
    """Without the data each such test says so in one line: skipped here, an error on CI."""
    missing = tmp_path / "no-such-testdata"
    env = {**os.environ, "SHMWRITER_TESTDATA": str(missing), "CI": ci}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-p", "no:cacheprovider", "-q", "-rsE",
         "-k", "not missing_data"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120)
    lines = result.stdout.splitlines()
    problem = (f"needs the real measurements: no folder {str(missing)!r} (dcnum's test data, "
               f"MIT licensed, from tests/data of https://github.com/DC-analysis/dcnum; "
               f"$SHMWRITER_TESTDATA may name another folder)")
    if outcome == "skipped":
        assert result.returncode == 0, result.stdout
        reasons = [line for line in lines if line.startswith("SKIPPED")]
        assert reasons and all(line.endswith(f": {problem}") for line in reasons), reasons
        assert sum(int(line.split()[1].strip("[]")) for line in reasons) == DATA_TESTS
    else:
        assert result.returncode == 1, result.stdout
        errors = [line for line in lines if line.startswith("ERROR")]
        assert len(errors) == DATA_TESTS, result.stdout
        expected = f" - Failed: {problem}; CI must have them, so this fails instead of skipping"
        assert all(line.endswith(expected) for line in errors), errors
        assert "Traceback" not in result.stdout
    assert "empty parameter set" not in result.stdout
    assert lines[-1].startswith(summary), lines[-1]
