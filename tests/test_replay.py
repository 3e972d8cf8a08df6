"""Replay of real measurements (dcnum's test data): the output equals the input, event for event."""

from __future__ import annotations

import pathlib
import re
import subprocess
import zipfile

import dclab
import h5py
import numpy as np
import pytest

from shmwriter.replay import ReplayInputError, ReplayPlan, replay

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "dcnum-testdata"
ZIPS = sorted(DATA.glob("*.zip"))


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


def test_the_three_measurements_are_there():
    assert len(ZIPS) == 3, f"expected the dcnum test data in {DATA}"


@pytest.mark.parametrize("archive", ZIPS, ids=[z.stem for z in ZIPS])
def test_replay_reproduces_the_measurement(tmp_path, archive):
    path_in = unzip(archive, tmp_path)
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


def test_frames_are_runs_of_the_frame_feature(tmp_path):
    path_in = unzip(next(z for z in ZIPS if "cytoshot_full-features_2024" in z.name), tmp_path)
    plan = ReplayPlan.from_file(path_in)
    with h5py.File(path_in, "r") as h5:
        frame = h5["events/frame"][:]
    assert plan.bounds[0] == 0 and plan.bounds[-1] == len(frame) == plan.events
    for start, stop in zip(plan.bounds[:-1], plan.bounds[1:], strict=True):
        assert (frame[start:stop] == frame[start]).all()
    assert plan.frames == len(np.unique(frame))  # sorted input: one run per frame value
    assert "shmwriter_replay_nevents" in plan.schema and "nevents" not in plan.schema


def test_replay_command_in_a_subprocess(tmp_path):
    path_in = unzip(next(z for z in ZIPS if "shapein" in z.name), tmp_path)
    path_out = tmp_path / "out.rtdc"
    result = subprocess.run(["shmwriter", "replay", str(path_in), str(path_out),
                             "--producers", "3", "--quiet"],
                            capture_output=True, text=True, timeout=120)
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
    result = subprocess.run(["shmwriter", "replay", str(path_in), str(tmp_path / "out.rtdc")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_replay_refuses_to_overwrite_its_input(tmp_path):
    path_in = unzip(ZIPS[0], tmp_path)
    with pytest.raises(ReplayInputError, match="is the input file; choose another path"):
        replay(path_in, path_in)
    with pytest.raises(ValueError, match="producers must be a positive int; got 0"):
        replay(path_in, tmp_path / "out.rtdc", producers=0)
