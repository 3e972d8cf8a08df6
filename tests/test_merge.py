"""merge_runs and `shmwriter merge`: a run written in parts, joined, equals one Writer's file."""

from __future__ import annotations

import subprocess
import sys

import dclab
import h5py
import hdf5plugin
import numpy as np
import pytest
from _workers import SCHEMA, events_of, nevents_of

import shmwriter
from shmwriter._rtdc import chunk_rows
from shmwriter._write.codec import ChunkCodec
from shmwriter.merge import merge_runs

METADATA = {"experiment:sample": "merge test", "imaging:pixel size": 0.34,
            "setup:channel width": 20.0}
LOGS = {"acquisition": ["camera=on", "laser=off"]}
FILTERS = {"zstd5": None, "uncompressed": {"compression": None},
           "gzip": {"compression": "gzip", "compression_opts": 1}}


def write_run(path, first_frame, nframes, *, missing=(), kwargs=None, schema=SCHEMA,
              events=events_of, open_ended=False, **options):
    """Frames ``first_frame ..`` of the whole, as frames 0 .. of a run of their own."""
    with shmwriter.Writer(path, schema, total_frames=None if open_ended else nframes,
                          mode="thread", write_threshold=7, metadata=METADATA, logs=LOGS,
                          allow_gaps=True, hdf5_dataset_kwargs=kwargs, **options) as writer:
        with writer.producer() as producer:
            for frame in range(nframes):
                if first_frame + frame not in missing:
                    producer.put(frame, events(first_frame + frame))


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
    assert [list(p.missing_frames) for p in placed] == [[17, 18], [], [41]]
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
        h5.create_dataset("events/nevents", data=np.ones(3, dtype=np.uint32))
    with pytest.raises(ValueError, match=r"c.rtdc' is not the file of a closed run"):
        merge_runs(tmp_path / "m.rtdc", [tmp_path / "a.rtdc", tmp_path / "c.rtdc"])
    with pytest.raises(ValueError, match="at least one part"):
        merge_runs(tmp_path / "m.rtdc", [])
    with pytest.raises(ValueError, match="is one of the parts"):
        merge_runs(tmp_path / "a.rtdc", [tmp_path / "a.rtdc"])


def test_slabs_of_two_events_still_make_whole_chunks(tmp_path, monkeypatch):
    """Reads of 2 rows at a time (frames have up to 3 events) fill chunks across reads."""
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
    # chunks of 1000 rows: a has none whole, and b's rows follow its last one
    assert result.stdout.strip().endswith(f"30 frames from 2 parts -> {tmp_path / 'm.rtdc'} "
                                          f"(0 stored chunks copied as they were)")
    assert_same_file(tmp_path / "m.rtdc", tmp_path / "whole.rtdc")
    bad = subprocess.run([sys.executable, "-m", "shmwriter", "merge", str(tmp_path / "m2.rtdc"),
                          str(tmp_path / "nothing.rtdc")], capture_output=True, text=True,
                         timeout=120, stdin=subprocess.DEVNULL)
    assert bad.returncode == 2 and "cannot be opened" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_an_output_that_names_a_part_another_way_is_refused_and_the_part_kept(tmp_path,
                                                                           monkeypatch):
    write_run(tmp_path / "a.rtdc", 0, 12)
    write_run(tmp_path / "b.rtdc", 12, 8)
    (tmp_path / "link.rtdc").symlink_to(tmp_path / "a.rtdc")
    before = file_contents(tmp_path / "a.rtdc")
    monkeypatch.chdir(tmp_path)
    for output in ("./a.rtdc", tmp_path / "link.rtdc"):
        with pytest.raises(ValueError, match="is one of the parts"):
            merge_runs(output, ["a.rtdc", tmp_path / "b.rtdc"])
    with pytest.raises(ValueError, match="is given twice"):
        merge_runs(tmp_path / "m.rtdc", [tmp_path / "a.rtdc", "./a.rtdc"])
    assert repr(file_contents(tmp_path / "a.rtdc")) == repr(before)


def test_a_failed_merge_leaves_an_existing_output_as_it_was(tmp_path):
    write_run(tmp_path / "a.rtdc", 0, 5)
    (tmp_path / "m.rtdc").write_bytes(b"keep me")
    (tmp_path / "bad.rtdc").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="cannot be opened"):
        merge_runs(tmp_path / "m.rtdc", [tmp_path / "a.rtdc", tmp_path / "bad.rtdc"])
    assert (tmp_path / "m.rtdc").read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.rtdc", "bad.rtdc", "m.rtdc"]


def test_an_aborted_part_is_taken_only_as_the_last(tmp_path):
    with pytest.raises(RuntimeError, match="stop"):
        with shmwriter.Writer(tmp_path / "a.rtdc", SCHEMA, total_frames=20,
                              mode="thread") as writer:
            with writer.producer() as producer:
                for frame in range(8):
                    producer.put(frame, events_of(frame))
            raise RuntimeError("stop")
    write_run(tmp_path / "b.rtdc", 20, 10)
    with pytest.raises(ValueError, match=r"a.rtdc' is an aborted run's file; only the last"):
        merge_runs(tmp_path / "m.rtdc", [tmp_path / "a.rtdc", tmp_path / "b.rtdc"])
    placed = merge_runs(tmp_path / "m.rtdc", [tmp_path / "b.rtdc", tmp_path / "a.rtdc"])
    assert placed[1].first_frame == 10 and list(placed[1].missing_frames) == list(range(18, 30))
    with h5py.File(tmp_path / "m.rtdc") as h5:
        run_log = [line.decode() for line in h5["logs"]["shmwriter-run"][:]]
    assert run_log[:6] == ["state=ABORTED", "total_frames=30", "frames_done=18",
                           "written_frames=18", "missing_frames=12", "rejected_frames=0"]


def test_open_ended_parts_merge_as_an_open_ended_run(tmp_path):
    write_run(tmp_path / "whole.rtdc", 0, 25, open_ended=True)
    write_run(tmp_path / "a.rtdc", 0, 10, open_ended=True)
    write_run(tmp_path / "b.rtdc", 10, 15, open_ended=True)
    merge_runs(tmp_path / "m.rtdc", [tmp_path / "a.rtdc", tmp_path / "b.rtdc"])
    assert_same_file(tmp_path / "m.rtdc", tmp_path / "whole.rtdc")


OWN_FRAME = shmwriter.Schema({"deform": shmwriter.Feature("float32"),
                              "frame": shmwriter.Feature("int64")})


def own_frame_events(frame):
    """Camera frame ids of the user's own (1000 + 10 f), two events, none every third frame."""
    if frame % 3 == 0:
        return None
    return {"deform": np.full(2, frame, np.float32), "frame": np.full(2, 1000 + 10 * frame)}


@pytest.mark.parametrize(("schema", "events", "options"), [
    (OWN_FRAME, own_frame_events, {}),
    (SCHEMA, events_of, {"index_feature": None}),
    (SCHEMA, events_of, {"index_feature": "index_unmapped"}),
], ids=["own-frame-feature", "no-index-feature", "index_unmapped"])
def test_features_of_the_schema_are_copied_and_the_writers_frame_index_shifted(tmp_path, schema,
                                                                         events, options):
    for name, first, count in (("whole", 0, 30), ("a", 0, 13), ("b", 13, 17)):
        write_run(tmp_path / f"{name}.rtdc", first, count, schema=schema, events=events,
                  **options)
    merge_runs(tmp_path / "m.rtdc", [tmp_path / "a.rtdc", tmp_path / "b.rtdc"])
    assert_same_file(tmp_path / "m.rtdc", tmp_path / "whole.rtdc")


def test_a_fill_value_is_kept(tmp_path):
    for name, first, count in (("whole", 0, 20), ("a", 0, 9), ("b", 9, 11)):
        write_run(tmp_path / f"{name}.rtdc", first, count, kwargs={"fillvalue": 7})
    merge_runs(tmp_path / "m.rtdc", [tmp_path / "a.rtdc", tmp_path / "b.rtdc"])
    assert_same_file(tmp_path / "m.rtdc", tmp_path / "whole.rtdc")


def test_a_gap_of_ten_million_frames_stays_one_range(tmp_path):
    schema = shmwriter.Schema({"deform": shmwriter.Feature("float32")})
    for name, total in (("a", 10**7), ("b", 5)):
        with shmwriter.Writer(tmp_path / f"{name}.rtdc", schema, total_frames=total,
                              mode="thread", allow_gaps=True) as writer:
            with writer.producer() as producer:
                producer.put(1, {"deform": np.ones(1, np.float32)})
    placed = merge_runs(tmp_path / "m.rtdc", [tmp_path / "a.rtdc", tmp_path / "b.rtdc"])
    assert placed[1].missing_frames.spans == [(10**7, 10**7 + 1), (10**7 + 2, 10**7 + 5)]
    with h5py.File(tmp_path / "m.rtdc") as h5:
        assert h5["logs"]["shmwriter-missing-frames"][:].tolist() == [
            b"0", b"2-10000000", b"10000002-10000004"]


def test_the_merge_command_says_what_is_wrong_in_one_line(tmp_path):
    write_run(tmp_path / "a.rtdc", 0, 5)
    (tmp_path / "dir.rtdc").mkdir()
    result = subprocess.run([sys.executable, "-m", "shmwriter", "merge", str(tmp_path / "m.rtdc"),
                             str(tmp_path / "a.rtdc"), str(tmp_path / "dir.rtdc")],
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "dir.rtdc" in result.stderr


assert hdf5plugin  # the Zstd filter of the parts


#: 30,000 bytes an image: HDF5 chunks of a few dozen rows, so short runs hold whole ones.
BIG = shmwriter.Schema({"image": shmwriter.Feature("uint8", (120, 250)),
                        "deform": shmwriter.Feature("float32")})
BIG_CHUNK_ROWS = chunk_rows(BIG["image"].event_nbytes)


def big_events(frame):
    n = nevents_of(frame)
    if n == 0:
        return None
    rng = np.random.default_rng(frame)
    return {"image": rng.integers(0, 256, (n, 120, 250), dtype=np.uint8),
            "deform": rng.random(n).astype(np.float32)}


def rows_before(frame):
    return sum(nevents_of(f) for f in range(frame))


@pytest.mark.parametrize("filters", list(FILTERS))
def test_chunks_that_line_up_are_copied_as_stored_the_rest_encoded_again(tmp_path, filters):
    kwargs, total = FILTERS[filters], 90
    write_run(tmp_path / "whole.rtdc", 0, total, schema=BIG, events=big_events, kwargs=kwargs)
    lined_up = next(f for f in range(20, 70) if rows_before(f) % BIG_CHUNK_ROWS == 0)
    apart = next(f for f in range(40, 70) if rows_before(f) % BIG_CHUNK_ROWS)
    for split in (lined_up, apart):
        a, b = tmp_path / f"a{split}.rtdc", tmp_path / f"b{split}.rtdc"
        write_run(a, 0, split, schema=BIG, events=big_events, kwargs=kwargs)
        write_run(b, split, total - split, schema=BIG, events=big_events, kwargs=kwargs)
        merged = tmp_path / f"m{split}.rtdc"
        placed = merge_runs(merged, [a, b])
        assert_same_file(merged, tmp_path / "whole.rtdc")
        # only the images have whole chunks this short (scalars: 1000 rows a chunk);
        # the second part's line up only if the first part ends on a chunk boundary, and
        # then its last, incomplete chunk is the merged file's last too: copied as well
        rows_a, rows_b = rows_before(split), rows_before(total) - rows_before(split)
        assert placed[0].copied_chunks == rows_a // BIG_CHUNK_ROWS > 0
        assert placed[1].copied_chunks == (-(-rows_b // BIG_CHUNK_ROWS) if split == lined_up
                                           else 0)
        with h5py.File(merged) as ours, h5py.File(tmp_path / "whole.rtdc") as one:
            for row in range(0, len(one["events/image"]), BIG_CHUNK_ROWS):
                assert ours["events/image"].id.read_direct_chunk((row, 0, 0)) == \
                    one["events/image"].id.read_direct_chunk((row, 0, 0)), row


def test_a_copied_chunk_keeps_the_bytes_its_part_stored(tmp_path):
    """A chunk Zstd-compressed at level 1 in a level-5 dataset (HDF5 reads it alike) comes
    through as it was: copied, not decoded and encoded again."""
    write_run(tmp_path / "whole.rtdc", 0, 40, schema=BIG, events=big_events)
    write_run(tmp_path / "a.rtdc", 0, 40, schema=BIG, events=big_events)
    with h5py.File(tmp_path / "a.rtdc", "r+") as h5:
        image = h5["events/image"]
        level1 = ChunkCodec(zstd_level=1, fletcher32=True).encode(image[:BIG_CHUNK_ROWS])
        assert level1 != image.id.read_direct_chunk((0, 0, 0))[1]
        image.id.write_direct_chunk((0, 0, 0), level1)
        chunks = sum(-(-len(d) // d.chunks[0]) for d in h5["events"].values())
    placed = merge_runs(tmp_path / "m.rtdc", [tmp_path / "a.rtdc"])
    assert placed[0].copied_chunks == chunks  # one part lines up everywhere, edges too
    with h5py.File(tmp_path / "m.rtdc") as h5:
        assert h5["events/image"].id.read_direct_chunk((0, 0, 0)) == (0, bytes(level1))
    assert_same_file(tmp_path / "m.rtdc", tmp_path / "whole.rtdc")


def one_big_event(frame):
    rng = np.random.default_rng(frame)
    return {"image": rng.integers(0, 256, (1, 120, 250), dtype=np.uint8),
            "deform": rng.random(1).astype(np.float32)}


@pytest.mark.parametrize(("frames", "empty_last", "copied"), [
    # the third part starts on a chunk boundary after two that do not end on one: its
    # two whole image chunks and its last one (the file's last) are copied
    ((10, 24, 100), False, [0, 0, 3]),
    # a part without events after the last with events: the latter's last chunks end the
    # merged file, so they are copied too (3 of the images; deform, frame and nevents: 1)
    ((100, 5), True, [6, 0]),
], ids=["after-parts-off-the-boundary", "before-a-part-without-events"])
def test_chunks_that_line_up_after_other_parts_are_copied(tmp_path, frames, empty_last,
                                                          copied):
    parts, at = [], 0
    for k, count in enumerate(frames):
        parts.append(tmp_path / f"p{k}.rtdc")
        nothing = empty_last and k == len(frames) - 1
        write_run(parts[-1], at, count, schema=BIG,
                  events=(lambda frame: None) if nothing else one_big_event)
        at += count
    placed = merge_runs(tmp_path / "m.rtdc", parts)
    assert [p.copied_chunks for p in placed] == copied
    with_events = sum(frames[:-1]) if empty_last else sum(frames)
    with h5py.File(tmp_path / "m.rtdc") as h5:
        np.testing.assert_array_equal(h5["events/image"][:], np.concatenate(
            [one_big_event(f)["image"] for f in range(with_events)]))


@pytest.mark.parametrize("kwargs", [
    {"fillvalue": float("nan")}, {"fillvalue": 0.5}, {"fillvalue": -1},
    dict(hdf5plugin.Blosc()), dict(hdf5plugin.Bitshuffle()),
], ids=["fill-nan", "fill-half", "fill-minus-one", "blosc", "bitshuffle"])
def test_filters_and_fill_values_hdf5_sets_per_dataset_merge_too(tmp_path, kwargs):
    """A fill value cast to each feature's dtype, and filters whose options HDF5 fills in
    per dataset (Blosc, Bitshuffle: the type size), differ between a file's features:
    each feature is created again as its part's, not refused."""
    write_run(tmp_path / "whole.rtdc", 0, 30, kwargs=kwargs)
    write_run(tmp_path / "a.rtdc", 0, 13, kwargs=kwargs)
    write_run(tmp_path / "b.rtdc", 13, 17, kwargs=kwargs)
    merge_runs(tmp_path / "m.rtdc", [tmp_path / "a.rtdc", tmp_path / "b.rtdc"])
    assert_same_file(tmp_path / "m.rtdc", tmp_path / "whole.rtdc")
    with h5py.File(tmp_path / "m.rtdc") as ours, h5py.File(tmp_path / "whole.rtdc") as one:
        for name, dataset in one["events"].items():
            assert repr(ours["events"][name].fillvalue) == repr(dataset.fillvalue), name
            assert ours["events"][name]._filters == dataset._filters, name
