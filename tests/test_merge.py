"""merge_runs and `shmwriter merge`: a run written in parts, joined, equals one Writer's file."""

from __future__ import annotations

import subprocess
import sys

import dclab
import h5py
import hdf5plugin
import numpy as np
import pytest
from _workers import SCHEMA, events_of

import shmwriter
from shmwriter.merge import merge_runs

METADATA = {"experiment:sample": "merge test", "imaging:pixel size": 0.34,
            "setup:channel width": 20.0}
LOGS = {"acquisition": ["camera=on", "laser=off"]}
FILTERS = {"zstd5": None, "uncompressed": {"compression": None},
           "gzip": {"compression": "gzip", "compression_opts": 1}}


def write_run(path, first_frame, nframes, *, missing=(), kwargs=None):
    """Frames ``first_frame ..`` of the whole, as frames 0 .. of a run of their own."""
    with shmwriter.Writer(path, SCHEMA, total_frames=nframes, mode="thread", write_threshold=7,
                          metadata=METADATA, logs=LOGS, allow_gaps=True,
                          hdf5_dataset_kwargs=kwargs) as writer:
        with writer.producer() as producer:
            for frame in range(nframes):
                if first_frame + frame not in missing:
                    producer.put(frame, events_of(first_frame + frame))


def file_contents(path):
    """Every dataset (values, dtype, chunks, filters, attributes), root attributes, logs."""
    with h5py.File(path, "r") as h5:
        events = {name: (d[:], d.dtype, d.chunks, d.compression_opts, d.fletcher32,
                         dict(d.attrs)) for name, d in h5["events"].items()}
        logs = {name: d[:].tolist() for name, d in h5["logs"].items()}
        return events, dict(h5.attrs), logs


def assert_same_file(ours, theirs):
    (events, attrs, logs), (events2, attrs2, logs2) = file_contents(ours), file_contents(theirs)
    assert sorted(events) == sorted(events2)
    for name, (values, *layout) in events.items():
        values2, *layout2 = events2[name]
        np.testing.assert_array_equal(values, values2, err_msg=name)
        assert repr(layout) == repr(layout2), name
    assert repr(sorted(attrs.items())) == repr(sorted(attrs2.items()))
    assert logs == logs2


def check_report(path):
    return dclab.rtdc_dataset.check_dataset(str(path))


@pytest.mark.parametrize("filters", list(FILTERS))
def test_a_run_written_in_three_parts_merges_into_the_file_of_one_writer(tmp_path, filters):
    kwargs, missing = FILTERS[filters], {17, 18, 41}
    write_run(tmp_path / "whole.rtdc", 0, 60, missing=missing, kwargs=kwargs)
    bounds = [(0, 25), (25, 15), (40, 20)]
    parts = [tmp_path / f"part{k}.rtdc" for k in range(3)]
    for part, (first, count) in zip(parts, bounds, strict=True):
        write_run(part, first, count, missing=missing, kwargs=kwargs)
    placed = merge_runs(tmp_path / "merged.rtdc", parts)
    assert [(p.first_frame, p.frames) for p in placed] == bounds
    assert [p.missing_frames for p in placed] == [(17, 18), (), (41,)]
    assert_same_file(tmp_path / "merged.rtdc", tmp_path / "whole.rtdc")
    assert check_report(tmp_path / "merged.rtdc") == check_report(tmp_path / "whole.rtdc")
    with dclab.new_dataset(tmp_path / "merged.rtdc") as ds:
        assert len(ds) == sum(p.events for p in placed) > 0


def test_merged_chunks_are_stored_as_one_writer_stores_them(tmp_path):
    write_run(tmp_path / "whole.rtdc", 0, 50)
    write_run(tmp_path / "a.rtdc", 0, 21)
    write_run(tmp_path / "b.rtdc", 21, 29)
    merge_runs(tmp_path / "merged.rtdc", [tmp_path / "a.rtdc", tmp_path / "b.rtdc"])
    with h5py.File(tmp_path / "merged.rtdc") as ours, h5py.File(tmp_path / "whole.rtdc") as one:
        for name, dataset in one["events"].items():
            zeros = (0,) * (dataset.ndim - 1)
            for row in range(0, len(dataset), dataset.chunks[0]):
                assert ours["events"][name].id.read_direct_chunk((row, *zeros)) == \
                    dataset.id.read_direct_chunk((row, *zeros)), (name, row)


def test_parts_that_do_not_fit_together_are_refused_naming_the_part(tmp_path):
    write_run(tmp_path / "a.rtdc", 0, 5)
    write_run(tmp_path / "b.rtdc", 5, 5, kwargs={"compression": None})
    with pytest.raises(ValueError, match=r"b.rtdc'.*feature '\w+' is stored differently"):
        merge_runs(tmp_path / "m.rtdc", [tmp_path / "a.rtdc", tmp_path / "b.rtdc"])
    with h5py.File(tmp_path / "c.rtdc", "w") as h5:
        h5.create_dataset("events/deform", data=np.zeros(3))
        h5.create_dataset("events/frame", data=np.arange(3, dtype=np.uint32))
    with pytest.raises(ValueError, match=r"c.rtdc' is not the file of a closed run"):
        merge_runs(tmp_path / "m.rtdc", [tmp_path / "a.rtdc", tmp_path / "c.rtdc"])
    with pytest.raises(ValueError, match="at least one part"):
        merge_runs(tmp_path / "m.rtdc", [])
    with pytest.raises(ValueError, match="is one of the parts"):
        merge_runs(tmp_path / "a.rtdc", [tmp_path / "a.rtdc"])


def test_slabs_end_between_frames_even_for_a_frame_larger_than_a_slab(tmp_path, monkeypatch):
    """With slabs of 2 events, every frame (up to 3 events) is still appended whole."""
    import shmwriter.merge

    monkeypatch.setattr(shmwriter.merge, "_SLAB_NBYTES", 2 * SCHEMA.event_nbytes)
    write_run(tmp_path / "whole.rtdc", 0, 30)
    write_run(tmp_path / "a.rtdc", 0, 13)
    write_run(tmp_path / "b.rtdc", 13, 17)
    merge_runs(tmp_path / "m.rtdc", [tmp_path / "a.rtdc", tmp_path / "b.rtdc"])
    assert_same_file(tmp_path / "m.rtdc", tmp_path / "whole.rtdc")


def test_the_merge_command(tmp_path):
    write_run(tmp_path / "whole.rtdc", 0, 30)
    write_run(tmp_path / "a.rtdc", 0, 12)
    write_run(tmp_path / "b.rtdc", 12, 18)
    result = subprocess.run([sys.executable, "-m", "shmwriter", "merge",
                             str(tmp_path / "m.rtdc"), str(tmp_path / "a.rtdc"),
                             str(tmp_path / "b.rtdc")], capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"30 frames from 2 parts -> {tmp_path / 'm.rtdc'}")
    assert_same_file(tmp_path / "m.rtdc", tmp_path / "whole.rtdc")
    bad = subprocess.run([sys.executable, "-m", "shmwriter", "merge", str(tmp_path / "m2.rtdc"),
                          str(tmp_path / "nothing.rtdc")], capture_output=True, text=True,
                         timeout=120, stdin=subprocess.DEVNULL)
    assert bad.returncode == 2 and "cannot be opened" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


assert hdf5plugin  # the Zstd filter of the parts
