"""Mistakes on the command line give one line on stderr and exit code 2; ``--version``.

Each case runs the real ``shmwriter`` command in a subprocess on real files and folders.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from _cli_workers import shmwriter_cli

import shmwriter

#: Text that shows the error came straight from HDF5 (or Python), not from the CLI.
RAW = ("Traceback", "HDF5", "Unable to", "errno", "Errno", "BrokenError", "o_flags")


def assert_one_line_mistake(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr == f"{expected}\n", result.stderr
    assert not [word for word in RAW if word in result.stderr], result.stderr


@pytest.fixture
def small_input(tmp_path):
    """A small replayable .rtdc file: 6 events (an image and a scalar each) in 4 frames."""
    path = tmp_path / "in.rtdc"
    with h5py.File(path, "w") as h5:
        h5["events/frame"] = np.array([0, 1, 1, 2, 3, 3], np.uint32)
        h5["events/deform"] = np.linspace(0, 1, 6)
        h5["events/image"] = np.arange(6 * 80 * 250).reshape(6, 80, 250).astype(np.uint8)
    return path


def test_demo_output_that_is_a_directory(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    result = shmwriter_cli("demo", "--frames", "10", "--quiet", "-o", str(folder))
    assert_one_line_mistake(result, f"shmwriter demo: error: --output {str(folder)!r} is a "
                                    f"directory; expected the path of the .rtdc file to write")
    assert list(folder.iterdir()) == []


def test_demo_output_in_a_missing_directory(tmp_path):
    path = tmp_path / "no" / "x.rtdc"
    result = shmwriter_cli("demo", "--frames", "10", "--quiet", "--output", str(path))
    assert_one_line_mistake(result, f"shmwriter demo: error: cannot write {str(path)!r}: "
                                    f"directory {str(path.parent)!r} does not exist")


def test_replay_output_that_is_a_directory(tmp_path, small_input):
    folder = tmp_path / "out"
    folder.mkdir()
    result = shmwriter_cli("replay", str(small_input), str(folder), "--quiet")
    assert_one_line_mistake(result, f"shmwriter replay: error: the output {str(folder)!r} is a "
                                    f"directory; expected the path of the .rtdc file to write")
    assert list(folder.iterdir()) == []


def test_replay_input_that_is_a_directory(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    result = shmwriter_cli("replay", str(folder), str(tmp_path / "out.rtdc"), "--quiet")
    assert_one_line_mistake(result, f"shmwriter replay: error: {str(folder)!r} is a directory; "
                                    f"expected an .rtdc file")
    assert not (tmp_path / "out.rtdc").exists()


def test_replay_of_a_small_file_works(tmp_path, small_input):
    """The same input replays when the output is a file path: the checks above are exact."""
    path_out = tmp_path / "out.rtdc"
    result = shmwriter_cli("replay", str(small_input), str(path_out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("6 events in 4 frames replayed by 2 producer(s) in ")
    with h5py.File(path_out, "r") as h5, h5py.File(small_input, "r") as src:
        for name in ("frame", "deform", "image"):
            np.testing.assert_array_equal(h5["events"][name][:], src["events"][name][:])


@pytest.mark.parametrize("command", ["script", "module"])
def test_version(command):
    version = importlib.metadata.version("shmwriter")
    assert version == shmwriter.__version__
    script = os.path.join(os.path.dirname(sys.executable), "shmwriter")
    argv = [script] if command == "script" else [sys.executable, "-m", "shmwriter"]
    result = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == (f"shmwriter {version}\n", "")
