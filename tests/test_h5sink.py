"""H5Sink: round trips through every filter combination, live and killed writers, dclab."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import threading
import time

import dclab
import h5py
import hdf5plugin
import numpy as np
import pytest
import zstandard

from shmwriter._spec import Feature, Schema
from shmwriter._write.codec import codec_for, fletcher32
from shmwriter._write.gather import Chunk, ChunkGatherer, plain_layouts
from shmwriter._write.h5sink import H5Sink, dataset_kwargs
from shmwriter.ops.demo import DEMO_METADATA, DEMO_SCHEMA, demo_events

#: HDF5 chunk rows: image and mask 655, blob 623 (an odd number of odd rows:
#: 1,047,263-byte chunks), deform, frame and nevents 1000.
SCHEMA = Schema({
    "image": Feature("uint8", (32, 50)),
    "mask": Feature("bool", (32, 50)),
    "blob": Feature("uint8", (41, 41)),
    "deform": Feature("float64"),
})
DERIVED = ("frame", "nevents")
#: Writes of one row, one row short of / exactly / one past a chunk, many chunks.
WRITE_SIZES = (1, 622, 1, 623, 624, 1, 655, 656, 1000, 999, 1, 2500, 7)

FILTERS = {
    "zstd5+fletcher32": None,  # the default
    "fletcher32": {"compression": None},
    "zstd5": {"fletcher32": False},
    "none": {"compression": None, "fletcher32": False},
    "gzip+fletcher32 (through HDF5)": {"compression": "gzip", "compression_opts": 1},
    "shuffle+zstd5+fletcher32 (through HDF5)": {"shuffle": True},
}


def make_events(rng: np.random.Generator, index: int, nevents: int) -> dict[str, np.ndarray]:
    """Events of chunk ``index`` in file dtypes, with the derived features the gatherer adds
    when they come as one frame ``index``; images smooth enough for Zstd to have work."""
    base = np.linspace(0, 120, 32 * 50, dtype=np.float32).reshape(32, 50)
    noise = rng.normal(0, 3, (nevents, 32, 50))
    return {
        "image": np.clip(base + noise, 0, 255).astype(np.uint8),
        "mask": (noise > 2).astype(np.uint8) * np.uint8(255),
        "blob": rng.integers(0, 256, (nevents, 41, 41), dtype=np.uint8),
        "deform": rng.random(nevents),
        "frame": np.full(nevents, index, np.uint32),
        "nevents": np.full(nevents, nevents, np.uint32),
    }


def make_events_list(sizes: tuple[int, ...], seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [make_events(rng, index, n) for index, n in enumerate(sizes)]


def gather(sink: H5Sink, events: list[dict[str, np.ndarray]]) -> list[Chunk]:
    """Chunks of ``events`` (one frame each) laid out for ``sink``, as the writer gathers."""
    gatherer = ChunkGatherer(SCHEMA, DERIVED, sink.layouts)
    chunks = []
    for index, arrays in enumerate(events):
        gatherer.append(index, len(arrays["deform"]), arrays)
        chunks.append(gatherer.take())
    return chunks


def write_all(sink: H5Sink, events: list[dict[str, np.ndarray]]) -> None:
    for chunk in gather(sink, events):
        sink.write(chunk)


def joined(events: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([e[name] for e in events]) for name in events[0]}


def read_events(path, **kwargs) -> dict[str, np.ndarray]:
    with h5py.File(path, "r", **kwargs) as h5:
        return {name: dataset[:] for name, dataset in h5["events"].items()}


def assert_events_equal(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(expected)
    for name, array in expected.items():
        assert got[name].dtype == array.dtype, name
        assert got[name].shape == array.shape, name
        assert np.array_equal(got[name], array), name


@pytest.mark.parametrize("filters", list(FILTERS))
def test_round_trip_with_writes_of_odd_sizes(tmp_path, filters):
    events = make_events_list(WRITE_SIZES)
    sink = H5Sink(tmp_path / "a.rtdc", SCHEMA, DERIVED, FILTERS[filters], {})
    write_all(sink, events)
    assert sink.nevents == sum(WRITE_SIZES)
    sink.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("shmwriter-encode")]
    assert_events_equal(read_events(tmp_path / "a.rtdc"), joined(events))
    with h5py.File(tmp_path / "a.rtdc", "r") as h5:
        assert h5.attrs["experiment:event count"] == sum(WRITE_SIZES)


def write_with_h5py(path, events: list[dict[str, np.ndarray]], overrides) -> None:
    """The plain path: HDF5 filters every write itself."""
    with h5py.File(path, "w", libver="latest") as h5:
        for name, array in events[0].items():
            rows = {"image": 655, "mask": 655, "blob": 623}.get(name, 1000)
            h5.create_dataset(name, shape=(0, *array.shape[1:]), maxshape=(None, *array.shape[1:]),
                              chunks=(rows, *array.shape[1:]), dtype=array.dtype,
                              **dataset_kwargs(overrides))
        for arrays in events:
            for name, array in arrays.items():
                start = len(h5[name])
                h5[name].resize(start + len(array), axis=0)
                h5[name][start:] = array


def stored_chunks(dataset: h5py.Dataset) -> list[bytes]:
    zeros = (0,) * (dataset.ndim - 1)
    chunks = []
    for start in range(0, len(dataset), dataset.chunks[0]):
        mask, raw = dataset.id.read_direct_chunk((start, *zeros))
        assert mask == 0
        chunks.append(raw)
    return chunks


@pytest.mark.parametrize("filters", ["zstd5+fletcher32", "fletcher32", "none"])
def test_stored_chunks_match_what_hdf5_stores(tmp_path, filters):
    # The same writes through plain h5py: partial last chunks padded alike, the same
    # checksums; Zstd frames must decode alike (their bytes may differ by zstd version).
    events = make_events_list((1, 700, 1300, 55))
    sink = H5Sink(tmp_path / "ours.rtdc", SCHEMA, DERIVED, FILTERS[filters], {})
    write_all(sink, events)
    sink.close()
    write_with_h5py(tmp_path / "theirs.h5", events, FILTERS[filters])
    with (h5py.File(tmp_path / "ours.rtdc", "r") as ours,
          h5py.File(tmp_path / "theirs.h5", "r") as theirs):
        for name in events[0]:
            codec = codec_for(ours["events"][name])
            assert codec is not None
            mine, hdf5s = stored_chunks(ours["events"][name]), stored_chunks(theirs[name])
            assert len(mine) == len(hdf5s) > 0
            for our_raw, their_raw in zip(mine, hdf5s, strict=True):
                if codec.zstd_level is None:
                    assert our_raw == their_raw, name
                    continue
                our_body, their_body = our_raw[:-4], their_raw[:-4]
                assert fletcher32(our_body).to_bytes(4, "little") == our_raw[-4:]
                decompress = zstandard.ZstdDecompressor().decompress
                assert decompress(our_body) == decompress(their_body), name


def test_every_flush_shows_every_row(tmp_path):
    # A copy taken after each write is what a live reader or a killed writer leaves.
    events = make_events_list((1, 654, 2, 1310, 999, 3))
    sink = H5Sink(tmp_path / "live.rtdc", SCHEMA, DERIVED, None, {})
    for count, chunk in enumerate(gather(sink, events), start=1):
        sink.write(chunk)
        shutil.copyfile(tmp_path / "live.rtdc", tmp_path / "copy.rtdc")
        assert_events_equal(read_events(tmp_path / "copy.rtdc", swmr=True), joined(events[:count]))
    sink.abandon()  # like a killed writer: the file may keep its SWMR write flags
    assert_events_equal(read_events(tmp_path / "live.rtdc", swmr=True), joined(events))


def write_then_wait(path: str, sizes: tuple[int, ...], done: multiprocessing.connection.Connection,
                    ) -> None:
    """Child: write ``sizes`` (flushing each), report, then wait to be killed."""
    sink = H5Sink(path, SCHEMA, DERIVED, None, {})
    write_all(sink, make_events_list(sizes, seed=7))
    done.send(sink.nevents)
    done.recv()  # never answered: the parent kills this process


def test_killed_writer_leaves_every_flushed_row(tmp_path):
    sizes = (3, 700, 1, 1200)
    path = str(tmp_path / "killed.rtdc")
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    child = context.Process(target=write_then_wait, args=(path, sizes, child_end))
    child.start()
    try:
        assert parent_end.poll(60), "the writer process did not report"
        assert parent_end.recv() == sum(sizes)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    assert child.exitcode == -signal.SIGKILL
    assert_events_equal(read_events(path, swmr=True), joined(make_events_list(sizes, seed=7)))


def test_dclab_opens_a_demo_file(tmp_path):
    frames = [(index, ev) for index in range(80) if (ev := demo_events(index)) is not None]
    sink = H5Sink(tmp_path / "demo.rtdc", DEMO_SCHEMA, DERIVED, None, DEMO_METADATA)
    gatherer = ChunkGatherer(DEMO_SCHEMA, DERIVED, sink.layouts)
    for events in (frames[:1], frames[1:30], frames[30:]):
        for index, ev in events:
            arrays = dict(ev, mask=ev["mask"].view(np.uint8) * np.uint8(255))
            gatherer.append(index, len(ev["time"]), arrays)
        sink.write(gatherer.take())
    sink.close()
    expected = {name: np.concatenate([ev[name] for _, ev in frames]) for name in DEMO_SCHEMA}
    expected["frame"] = np.concatenate([np.full(len(ev["time"]), index, np.uint32)
                                        for index, ev in frames])
    with dclab.new_dataset(tmp_path / "demo.rtdc") as ds:
        assert len(ds) == len(expected["time"]) > 52  # more than one image chunk
        assert np.array_equal(ds["deform"], expected["deform"])
        assert np.array_equal(ds["frame"], expected["frame"])
        for index in (0, 52, len(ds) - 1):
            assert np.array_equal(ds["image"][index], expected["image"][index])
            assert np.array_equal(ds["mask"][index], expected["mask"][index] > 0)


def test_zstd_level_comes_from_the_kwargs(tmp_path):
    events = make_events_list((900,))
    sink = H5Sink(tmp_path / "z1.rtdc", SCHEMA, DERIVED, dict(hdf5plugin.Zstd(clevel=1)), {})
    write_all(sink, events)
    sink.close()
    assert_events_equal(read_events(tmp_path / "z1.rtdc"), joined(events))


def test_closed_sink_refuses_writes_and_closes_once(tmp_path):
    sink = H5Sink(tmp_path / "c.rtdc", SCHEMA, DERIVED, None, {})
    chunks = gather(sink, make_events_list((5, 1)))
    sink.write(chunks[0])
    sink.close(missing_frames=[3], logs={"note": ["hello"]})
    sink.close()
    sink.abandon()
    assert repr(sink).endswith("(closed, 5 events)>")
    with pytest.raises(ValueError, match="cannot write to the closed file"):
        sink.write(chunks[1])
    with h5py.File(tmp_path / "c.rtdc", "r") as h5:
        assert list(h5["logs"]["note"][:]) == [b"hello"]
        assert list(h5["logs"]["shmwriter-missing-frames"][:]) == [b"3"]


def test_a_chunk_not_gathered_for_the_sink_changes_nothing(tmp_path):
    events = make_events_list((700, 5, 5))
    sink = H5Sink(tmp_path / "b.rtdc", SCHEMA, DERIVED, None, {})
    good = gather(sink, events[:1])[0]
    plain = ChunkGatherer(SCHEMA, DERIVED, plain_layouts(SCHEMA, DERIVED))
    plain.append(0, 700, events[0])
    elsewhere = plain.take()
    sink.write(good)
    with pytest.raises(ValueError, match="the chunk starts at row 0, but the file has 700"):
        sink.write(good)
    with pytest.raises(ValueError, match="the chunk starts at row 0"):
        sink.write(elsewhere)
    plain.append(1, 5, events[1])
    with pytest.raises(ValueError, match="column 'image' is not laid out as"):
        sink.write(plain.take())  # continues the file, but laid out plain
    assert sink.nevents == 700
    sink.abandon()
    assert_events_equal(read_events(tmp_path / "b.rtdc", swmr=True), joined(events[:1]))


def test_empty_chunk_writes_nothing(tmp_path):
    events = make_events_list((0, 4, 0))
    sink = H5Sink(tmp_path / "e.rtdc", SCHEMA, DERIVED, None, {})
    write_all(sink, events)
    sink.close()
    assert_events_equal(read_events(tmp_path / "e.rtdc"), joined(events))


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="metadata keys must look like 'section:key'"):
        H5Sink(tmp_path / "m.rtdc", SCHEMA, DERIVED, None, {"nosection": 1})
    with pytest.raises(ValueError, match="must not set 'dtype'"):
        H5Sink(tmp_path / "k.rtdc", SCHEMA, DERIVED, {"dtype": "u1"}, {})


def test_cpu_of_the_encoding_is_counted_once(tmp_path):
    """Small chunks (the scalar features') are encoded in the writing thread: their CPU is the
    encoding's, not also the write's, so the stages still add up to the threads' CPU."""
    small = Schema({"deform": Feature("float64"), "area": Feature("int32")})
    sink = H5Sink(tmp_path / "a.rtdc", small, (), None, {})
    gatherer = ChunkGatherer(small, (), sink.layouts)
    rng = np.random.default_rng(1)
    total_ns = 0
    for index in range(40):
        arrays = {"deform": rng.random(900), "area": rng.integers(0, 9, 900, dtype=np.int32)}
        gatherer.append(index, 900, arrays)
        chunk = gatherer.take()
        started = time.thread_time_ns()
        sink.write(chunk)
        total_ns += time.thread_time_ns() - started
    assert sink.encode_cpu_ns > 0 and sink.write_cpu_ns > 0
    # all of it ran in this thread: write + encode is this thread's time, not more
    assert sink.encode_cpu_ns + sink.write_cpu_ns <= total_ns
    sink.close()
    with h5py.File(tmp_path / "a.rtdc", "r") as h5:
        assert len(h5["events"]["deform"]) == 40 * 900


def test_the_pool_gets_its_chunks_first_whatever_the_order_of_features(tmp_path):
    """Scalars listed before the images: the large chunks still go to the pool first, so the
    small ones (encoded in the writing thread) never hold the pool's places in the window."""
    scalars_first = Schema({"deform": Feature("float64"), "image": Feature("uint8", (32, 50))})
    sink = H5Sink(tmp_path / "a.rtdc", scalars_first, (), None, {})
    gatherer = ChunkGatherer(scalars_first, (), sink.layouts)
    rng = np.random.default_rng(2)
    gatherer.append(0, 1400, {"deform": rng.random(1400),
                              "image": rng.integers(0, 9, (1400, 32, 50), dtype=np.uint8)})
    chunk = gatherer.take()
    order = [job[0].name.rsplit("/", 1)[1] for job in sink._jobs(chunk.columns)]
    assert order == ["image"] * 3 + ["deform"] * 2
    sink.write(chunk)
    sink.close()
    with h5py.File(tmp_path / "a.rtdc", "r") as h5:
        assert len(h5["events"]["image"]) == len(h5["events"]["deform"]) == 1400
