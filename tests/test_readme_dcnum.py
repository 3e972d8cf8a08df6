"""The dcnum example of README.md ("Coming from dcnum") runs as written.

The test takes the section's complete script (the Python block with a main
guard) out of README.md, writes it to a file and runs it with this Python in a
fresh process, in an empty directory, as a user would; then reads the file it
wrote with h5py and dclab.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import dclab
import h5py
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def dcnum_example() -> str:
    """The Python block of "## Coming from dcnum" that is a whole script (has a main guard)."""
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## Coming from dcnum\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end >= 0 else len(text)]
    blocks = re.findall(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)
    scripts = [block for block in blocks if 'if __name__ == "__main__":' in block]
    assert len(scripts) == 1, f"expected one complete script in the section; found {len(blocks)}"
    return scripts[0]


def test_the_dcnum_example_runs_as_written(tmp_path):
    script = tmp_path / "dcnum_example.py"
    script.write_text(dcnum_example(), encoding="utf-8")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    written = [path for path in tmp_path.iterdir() if path.suffix == ".rtdc"]
    assert len(written) == 1, sorted(tmp_path.iterdir())
    path = written[0]
    with h5py.File(path, "r") as h5:
        events = h5["events"]
        frames = events["index_unmapped"][:]
        nevents = len(frames)
        assert nevents > 0
        assert set(events) >= {"image", "mask", "deform", "index_unmapped", "nevents"}
        assert all(len(events[name]) == nevents for name in events)
        assert np.all(np.diff(frames.astype(np.int64)) >= 0)  # in frame order
        counts = np.bincount(frames)
        np.testing.assert_array_equal(events["nevents"][:], counts[frames])
        assert set(np.unique(events["mask"][:]).tolist()) <= {0, 255}
    # the script prints what it wrote; its listener shows the writer's log records
    printed = re.search(r"^(\d+) events in (\d+) frames -> (\S+) \(writer exit code 0\)$",
                        result.stdout, flags=re.M)
    assert printed, result.stdout
    assert int(printed[1]) == nevents and int(printed[2]) >= len(counts)
    assert printed[3] == path.name
    log = result.stderr.splitlines()
    assert log[0] == "Ready" and f"Counted {nevents} events" in log, log
    with h5py.File(path, "r") as h5:
        deform = h5["events/deform"][:]
    with dclab.new_dataset(path) as ds:
        assert len(ds) == nevents
        np.testing.assert_array_equal(ds["deform"], deform)
        assert ds["mask"][0].dtype == bool and ds["image"][0].shape == (80, 250)
    violations, alerts, _ = dclab.rtdc_dataset.check_dataset(path)
    # like dcnum's writer, the example writes events only: the run's metadata is the caller's
    # (dcnum's pipeline adds it); dclab finds nothing else to object to
    problems = [cue for cue in violations + alerts if not cue.startswith("Metadata: Missing")]
    assert problems == ["Features: Unknown key 'index_unmapped'"], problems
