"""End to end: spawned producers, any order, real files read back and compared exactly."""

from __future__ import annotations

import logging
import multiprocessing
import os
import time

import dclab
import h5py
import numpy as np
import pytest
from _workers import (
    SCHEMA,
    assert_file_holds,
    events_of,
    expected_arrays,
    nevents_of,
    put_frames_in_place,
    run_workers,
    wait_until,
)
from dclab.rtdc_dataset import check_dataset

import shmwriter
from shmwriter._rtdc import MISSING_FRAMES_LOG
from shmwriter.ops.demo import DEMO_METADATA, DEMO_SCHEMA, demo_events, produce_frames

CTX = multiprocessing.get_context("spawn")


def deal(frames: int, producers: int, seed: int = 0) -> list[list[int]]:
    order = np.random.default_rng(seed).permutation(frames)
    return [order[k::producers].tolist() for k in range(producers)]


@pytest.mark.parametrize(("producers", "mode"), [(1, "thread"), (2, "process"), (4, "thread"),
                                                 (6, "process")])
def test_spawned_producers_any_order(tmp_path, producers, mode):
    path, frames = tmp_path / "out.rtdc", 400
    with shmwriter.Writer(path, SCHEMA, total_frames=frames, slots=8, slot_events=2,
                          write_threshold=50, mode=mode) as writer:
        run_workers(writer, deal(frames, producers, seed=producers), most=5)
    assert_file_holds(path, range(frames), most=5)
    expected = expected_arrays(range(frames), most=5)
    assert writer.written_events == len(expected["area"])
    assert writer.written_frames == frames
    assert writer.missing_frames == []


def test_zero_copy_frames_spanning_slots(tmp_path):
    path, frames = tmp_path / "out.rtdc", 200
    with shmwriter.Writer(path, SCHEMA, total_frames=frames, slots=6, slot_events=2,
                          write_threshold=17) as writer:
        run_workers(writer, deal(frames, 3), target=put_frames_in_place, most=5)
    assert_file_holds(path, range(frames), most=5)


def test_file_passes_dclab_check(tmp_path):
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, DEMO_SCHEMA, total_frames=40, metadata=DEMO_METADATA) as writer:
        workers = [CTX.Process(target=produce_frames, args=(writer.producer(), share, 7))
                   for share in deal(40, 2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
    violations, alerts, _info = check_dataset(str(path))
    assert violations == []
    assert alerts == []
    with dclab.new_dataset(str(path)) as ds:
        expected = [demo_events(i, 7) for i in range(40)]
        deform = np.concatenate([e["deform"] for e in expected if e is not None])
        np.testing.assert_array_equal(ds["deform"], deform)
    with h5py.File(path) as h5:
        for name in ("image", "mask"):
            attrs = h5["events"][name].attrs
            assert attrs["CLASS"] == b"IMAGE"
            assert attrs["IMAGE_SUBCLASS"] == b"IMAGE_GRAYSCALE"
            assert attrs["IMAGE_VERSION"] == b"1.2"
            assert attrs["CLASS"].dtype.kind == "S"  # fixed-length ASCII
        assert h5["events"]["mask"].dtype == np.uint8
        assert set(np.unique(h5["events"]["mask"][:])) <= {0, 255}
        assert h5["events"]["image"].chunks[0] >= 10


def test_default_filters_and_override(tmp_path):
    for kwargs, compressed in ((None, True), ({"compression": None}, False)):
        path = tmp_path / f"{compressed}.rtdc"
        with shmwriter.Writer(path, SCHEMA, total_frames=20, hdf5_dataset_kwargs=kwargs) as w:
            run_workers(w, deal(20, 1))
        with h5py.File(path) as h5:
            dataset = h5["events"]["image"]
            assert dataset.fletcher32
            assert (dataset.compression is not None or "32015" in str(dataset._filters)) \
                == compressed
        assert_file_holds(path, range(20))


def test_descriptors_carry_no_array_bytes(tmp_path):
    """Only descriptors cross the pipes: their bytes are tiny next to the event data."""
    path, frames = tmp_path / "out.rtdc", 120
    with shmwriter.Writer(path, DEMO_SCHEMA, total_frames=frames,
                          hdf5_dataset_kwargs={"compression": None}) as writer:
        workers = [CTX.Process(target=produce_frames, args=(writer.producer(), share, 3))
                   for share in deal(frames, 2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        stats = writer.statistics()
    data_nbytes = writer.written_events * DEMO_SCHEMA.event_nbytes
    assert writer.written_events > 100
    # per frame: a 16-byte header and 4 bytes per slot, plus slot requests and hellos
    assert stats.descriptor_nbytes <= 48 * frames + 200
    assert stats.descriptor_nbytes < data_nbytes / 1000


def test_missing_frames_are_recorded_and_raised(tmp_path):
    path, frames = tmp_path / "out.rtdc", 60
    present = [i for i in range(frames) if i not in (5, 6, 40)]
    with pytest.raises(shmwriter.MissingFramesError, match=r"3 frame\(s\).*5-6, 40"):
        with shmwriter.Writer(path, SCHEMA, total_frames=frames, write_threshold=10) as writer:
            run_workers(writer, [present[::-1]])
    assert writer.missing_frames == [5, 6, 40]
    with h5py.File(path) as h5:
        lines = [x.decode() for x in h5["logs"][MISSING_FRAMES_LOG][:]]
    assert lines == ["5-6", "40"]  # one line per range
    assert_file_holds(path, present)


def test_allow_gaps_does_not_raise(tmp_path):
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, SCHEMA, total_frames=10, allow_gaps=True) as writer:
        run_workers(writer, [[0, 1, 2, 9]])
    assert writer.missing_frames == [3, 4, 5, 6, 7, 8]
    assert_file_holds(path, [0, 1, 2, 9])


def test_open_ended_run_ends_when_producers_close(tmp_path):
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, SCHEMA, write_threshold=7) as writer:
        run_workers(writer, [list(range(0, 90, 2)), list(range(1, 90, 2))])
    assert_file_holds(path, range(90))
    assert writer.written_frames == 90


def test_open_ended_run_flushes_partial_chunks(tmp_path):
    """A partial chunk reaches the file within flush_interval_s, readable live (SWMR)."""
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, SCHEMA, write_threshold=1000, flush_interval_s=0.2) as writer:
        producer = writer.producer()
        for frame in range(5):
            producer.put(frame, events_of(frame))
        expected = len(expected_arrays(range(5))["area"])
        deadline = time.monotonic() + 10
        while writer.written_events < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        with h5py.File(path, "r", libver="latest", swmr=True) as h5:
            np.testing.assert_array_equal(h5["events"]["area"][:],
                                          expected_arrays(range(5))["area"])
        producer.close()


def test_exception_in_block_aborts_cleanly(tmp_path):
    path = tmp_path / "out.rtdc"
    with pytest.raises(KeyError, match="boom"):
        with shmwriter.Writer(path, SCHEMA, total_frames=100, write_threshold=10) as writer:
            producer = writer.producer()
            for frame in range(30):
                producer.put(frame, events_of(frame))
            raise KeyError("boom")
    with h5py.File(path) as h5:  # closed and valid, holding what was gathered
        np.testing.assert_array_equal(h5["events"]["area"][:],
                                      expected_arrays(range(30))["area"])
    assert writer.closed


def test_thread_producers_in_the_main_process(tmp_path):
    import threading
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, SCHEMA, total_frames=120, slots=4) as writer:
        producer = writer.producer()
        threads = [threading.Thread(target=lambda k=k: [producer.put(i, events_of(i))
                                                        for i in range(k, 120, 3)])
                   for k in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert_file_holds(path, range(120))


def test_bad_arguments_are_refused(tmp_path):
    path = tmp_path / "out.rtdc"
    with pytest.raises(ValueError, match="slots must be a positive integer; got 0"):
        shmwriter.Writer(path, SCHEMA, slots=0)
    with pytest.raises(ValueError, match="mode must be 'thread' or 'process'; got 'fork'"):
        shmwriter.Writer(path, SCHEMA, mode="fork")
    with pytest.raises(TypeError, match="write_threshold must be an int"):
        shmwriter.Writer(path, SCHEMA, write_threshold=1.5)
    with pytest.raises(ValueError, match="flush_interval_s must be a positive number"):
        shmwriter.Writer(path, SCHEMA, flush_interval_s=0)
    with pytest.raises(FileNotFoundError, match=r"directory .*/no/such' does not exist"):
        shmwriter.Writer(tmp_path / "no" / "such" / "dir.rtdc", SCHEMA)
    (tmp_path / "taken").mkdir()
    with pytest.raises(shmwriter.BrokenError,
                       match=r"(?i)could not start: .*unable to .*create file"):
        shmwriter.Writer(tmp_path / "taken", SCHEMA)  # a directory, not a file


def test_closed_writer_and_pickling(tmp_path):
    import pickle
    writer = shmwriter.Writer(tmp_path / "out.rtdc", SCHEMA, total_frames=1)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(writer)
    producer = writer.producer()
    producer.put(0, None)
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(shmwriter.ClosedError, match="was closed"):
        writer.producer()
    assert "done" in repr(writer)
    assert os.path.exists(tmp_path / "out.rtdc")


def test_writer_process_forwards_its_log_records(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="shmwriter")
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, SCHEMA, total_frames=10, allow_gaps=True, mode="process") as w:
        run_workers(w, [[0, 1, 2, 7, 8, 9]])
        writer_pid = w.statistics().writer_pid
    records = [r for r in caplog.records if r.name == "shmwriter._write.loop"]
    assert any("4 frame(s) never arrived: 3-6" in r.getMessage() for r in records)
    assert all(r.process == writer_pid for r in records)
    assert writer_pid != os.getpid()


def test_live_reading_with_h5py_and_dclab(tmp_path):
    """The README recipe: open the file while the run is still writing."""
    path = tmp_path / "live.rtdc"
    with shmwriter.Writer(path, DEMO_SCHEMA, metadata=DEMO_METADATA, flush_interval_s=0.1,
                          write_threshold=1000) as writer:
        producer = writer.producer()
        for frame in range(60):
            producer.put(frame, demo_events(frame))
        deadline = time.monotonic() + 20
        while writer.written_frames < 60 and time.monotonic() < deadline:
            time.sleep(0.02)
        expected = np.concatenate([e["deform"] for e in map(demo_events, range(60))
                                   if e is not None])
        with h5py.File(path, "r", libver="latest", swmr=True) as h5:  # the recipe
            deform = h5["events"]["deform"]
            np.testing.assert_array_equal(deform[:], expected)
            producer.put(60, demo_events(60))
            while len(expected) + len(demo_events(60)["deform"]) > deform.shape[0] and \
                    time.monotonic() < deadline:
                time.sleep(0.02)
                deform.refresh()  # SWMR readers see new rows after refresh()
            assert deform.shape[0] == len(expected) + len(demo_events(60)["deform"])
        with dclab.new_dataset(str(path)) as ds:  # dclab falls back to SWMR by itself
            assert len(ds) >= len(expected)
            np.testing.assert_array_equal(ds["deform"][:len(expected)], expected)
        producer.close()


def test_a_memory_budget_for_small_events_takes_at_most_the_most_slots(tmp_path):
    """64 MiB of 4 KiB slots would be 16384 slots; the ring takes the most it may have."""
    schema = shmwriter.Schema({"deform": shmwriter.Feature("float32")})
    with shmwriter.Writer(tmp_path / "out.rtdc", schema, total_frames=1,
                          memory_budget_nbytes=64 * 2**20) as writer:
        assert writer.statistics().slots == 16000
        with writer.producer() as producer:
            producer.put(0, {"deform": np.ones(2, np.float32)})


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"index_feature": "bad"}, ValueError, "index_feature must be"),
    # found by the writer as it creates the file: it could not start, and says why
    ({"hdf5_dataset_kwargs": {"shape": (3,)}}, shmwriter.BrokenError, "must not set 'shape'"),
    ({"metadata": {"no-colon": 1}}, shmwriter.BrokenError, "section:key"),
])
def test_a_bad_argument_found_while_starting_is_named_and_leaves_nothing(tmp_path, kwargs, error,
                                                                         match):
    """Checked after the ring exists: the error reaches the caller as itself, and the ring
    is removed (the autouse fixture checks /dev/shm)."""
    with pytest.raises(error, match=match):
        shmwriter.Writer(tmp_path / "out.rtdc", SCHEMA, total_frames=1, **kwargs)


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_the_writer_reports_its_cpu_per_stage_once_the_run_has_ended(tmp_path, mode):
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, SCHEMA, total_frames=200, mode=mode) as writer:
        assert writer.stage_cpu_s == {}  # not before the end
        run_workers(writer, [list(range(0, 200, 2)), list(range(1, 200, 2))])
    stages = writer.stage_cpu_s
    assert set(stages) == {"descriptors", "gather", "encode", "hdf5"}
    assert all(seconds >= 0 for seconds in stages.values())
    assert stages["gather"] > 0 and stages["hdf5"] > 0 and stages["encode"] > 0


def _slots_for(frames: range, slot_events: int) -> int:
    return sum(-(-nevents_of(frame) // slot_events) for frame in frames)


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_frames_ahead_wait_in_the_ring_while_it_can_serve_the_lowest_frame(tmp_path, mode):
    """A block put ahead fills nearly the whole ring, then the frames before it come:
    each can be served, so nothing is copied out to the stash (a second copy), however
    few slots are left free."""
    ahead, first = range(100, 200), range(100)
    slots = _slots_for(ahead, 4) + 2  # the block ahead leaves two slots free
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, SCHEMA, total_frames=200, mode=mode, slots=slots,
                          slot_events=4) as writer:
        with writer.producer() as producer:
            for frame in [*ahead, *first]:
                producer.put(frame, events_of(frame))
        events = len(expected_arrays(range(200))["area"])
        assert wait_until(lambda: writer.written_events == events)
        assert writer.statistics().peak_stash_nbytes == 0
    assert_file_holds(path, range(200))


def test_frames_ahead_are_copied_out_when_the_lowest_frame_cannot_be_served(tmp_path):
    """The frames ahead take every slot: the frame they wait for gets its slot by copying
    them out, and every frame is written in order."""
    ahead = range(1, 60)
    slots = _slots_for(ahead, 4)
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, SCHEMA, total_frames=60, slots=slots, slot_events=4,
                          timeout_s=30) as writer:
        with writer.producer() as producer:
            for frame in [*ahead, 0]:
                producer.put(frame, events_of(frame) or events_of(1))
        assert writer.statistics().peak_stash_nbytes > 0  # frame 0's put returned: copied
    with h5py.File(path) as h5:
        assert h5["events/frame"][0] == 0 and np.all(np.diff(h5["events/frame"][:]) >= 0)


def test_producers_go_on_while_the_frontier_s_producer_is_slow(tmp_path):
    """One producer is attached and puts nothing for a while: the frames of the other fill
    the ring and go on through the stash (no room is kept for a frontier that stands
    still), and once frame 0 comes every frame is written in order."""
    path, last = tmp_path / "out.rtdc", 80
    with shmwriter.Writer(path, SCHEMA, total_frames=last + 1, slots=8, slot_events=4,
                          reorder_budget_nbytes=64 * 2**20) as writer:
        with writer.producer() as slow:
            slow.put(last, events_of(last))  # attached, then quiet
            run_workers(writer, [list(range(1, last))])  # returns once all are put
            assert writer.statistics().peak_stash_nbytes > 0
            slow.put(0, events_of(0) or events_of(1))
    with h5py.File(path) as h5:
        frames = h5["events/frame"][:]
    with_events = {0} | {frame for frame in range(1, last + 1) if nevents_of(frame)}
    assert set(frames.tolist()) == with_events and np.all(np.diff(frames) >= 0)


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_put_nowait_for_the_frame_a_full_ring_waits_for_gets_frames_copied_out(tmp_path, mode):
    """Every slot holds a frame waiting for frame 0: a put_nowait of frame 0 is answered at
    once, so the writer copies frames out for it there and then (it never waits in line)."""
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, SCHEMA, total_frames=9, slots=8, slot_events=4,
                          mode=mode) as writer:
        with writer.producer() as producer:
            for frame in range(1, 9):
                producer.put(frame, events_of(1))
            producer.put_nowait(0, events_of(1))
    with h5py.File(path) as h5:
        frames = h5["events/frame"][:]
    assert sorted(set(frames.tolist())) == list(range(9)) and np.all(np.diff(frames) >= 0)
