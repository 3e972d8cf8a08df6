"""Producer: every bad input is refused at the producer; the run goes on and loses nothing."""

from __future__ import annotations

import multiprocessing
import pickle

import h5py
import numpy as np
import pytest
from _workers import SCHEMA, events_of, expected_arrays

import shmwriter

CTX = multiprocessing.get_context("spawn")


def good(n: int = 2) -> dict[str, np.ndarray]:
    return {"image": np.zeros((n, 8, 10), np.uint8), "mask": np.zeros((n, 8, 10), bool),
            "deform": np.zeros(n, np.float32), "area": np.zeros(n, np.int64)}


def with_(key: str, value) -> dict:
    events = good()
    events[key] = value
    return events


BAD_EVENTS = [
    (with_("volume", np.zeros(2)), "frame 3: unknown feature 'volume'", "volume"),
    ({k: v for k, v in good().items() if k != "area"}, "frame 3: feature 'area' is missing",
     "area"),
    (with_("image", np.zeros((2, 10, 8), np.uint8)),
     r"frame 3: feature 'image' has shape \(2, 10, 8\); expected \(nevents, 8, 10\)", "image"),
    (with_("deform", np.zeros((2, 1), np.float32)),
     r"frame 3: feature 'deform' has shape \(2, 1\); expected \(nevents\)", "deform"),
    (with_("deform", np.zeros(2, np.float64)),
     "frame 3: feature 'deform' has dtype float64, which cannot be cast safely to float32",
     "deform"),
    (with_("mask", np.zeros((2, 8, 10), np.uint8)),
     "frame 3: feature 'mask' has dtype uint8, which cannot be cast safely to bool", "mask"),
    (with_("area", np.zeros(3, np.int64)), "frame 3: feature 'area' has 3 events but 'image' has 2",
     "area"),
    (with_("deform", np.float32(0.5)),
     r"frame 3: feature 'deform' has shape \(\); expected \(nevents\)", "deform"),
    (with_("image", np.zeros(2, np.uint8)),
     r"frame 3: feature 'image' has shape \(2,\); expected \(nevents, 8, 10\)", "image"),
]


@pytest.mark.parametrize(("events", "message", "feature"), BAD_EVENTS)
def test_bad_events_name_frame_and_feature(tmp_path, events, message, feature):
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, SCHEMA, total_frames=6) as writer:
        producer = writer.producer()
        for frame in (0, 1, 2):
            producer.put(frame, events_of(frame))
        with pytest.raises(shmwriter.FrameError, match=message) as info:
            producer.put(3, events)
        assert info.value.frame_index == 3
        assert info.value.feature == feature
        for frame in (3, 4, 5):  # the run goes on, and frame 3 may still come
            producer.put(frame, events_of(frame))
        producer.close()
    with h5py.File(path) as h5:
        np.testing.assert_array_equal(h5["events"]["area"][:], expected_arrays(range(6))["area"])


def test_array_likes_and_safe_casts_are_stored_as_the_schema_says(tmp_path):
    path = tmp_path / "out.rtdc"
    image = np.arange(2 * 8 * 10, dtype=np.uint8).reshape(2, 8, 10)
    events = {"image": image[::-1],  # not contiguous
              "mask": [[[True] * 10] * 8, [[False] * 10] * 8],  # nested lists
              "deform": np.array([0.25, 0.5], np.float16),  # cast safely to float32
              "area": [7, 9]}  # a list of ints: int64
    with shmwriter.Writer(path, SCHEMA, total_frames=1) as writer, writer.producer() as producer:
        producer.put(0, events)
    with h5py.File(path) as h5:
        group = h5["events"]
        np.testing.assert_array_equal(group["image"][:], image[::-1])
        np.testing.assert_array_equal(group["mask"][:, 0, 0], [255, 0])
        assert group["deform"].dtype == np.float32
        np.testing.assert_array_equal(group["deform"][:], [0.25, 0.5])
        np.testing.assert_array_equal(group["area"][:], [7, 9])


def test_bad_frame_indices(tmp_path):
    with shmwriter.Writer(tmp_path / "out.rtdc", SCHEMA, total_frames=4) as writer:
        producer = writer.producer()
        with pytest.raises(shmwriter.FrameError, match="frame index must be >= 0; got -1"):
            producer.put(-1, None)
        with pytest.raises(shmwriter.FrameError,
                           match=r"frame index 4 is out of range: the run has total_frames=4"):
            producer.put(4, None)
        with pytest.raises(TypeError, match=r"frame_index must be an int; got 1\.0"):
            producer.put(1.0, None)
        with pytest.raises(TypeError, match="events must be a mapping"):
            producer.put(1, [1, 2])
        producer.put(0, events_of(0))
        with pytest.raises(shmwriter.FrameError, match="frame 0 was already put"):
            producer.put(0, events_of(0))
        other = writer.producer()
        with pytest.raises(shmwriter.FrameError, match="frame 0 was already put"):
            other.put(0, None)
        for frame in (1, 2, 3):
            other.put(frame, events_of(frame))
        producer.close()
        other.close()
    assert writer.written_frames == 4


def test_open_ended_duplicate_behind_the_writer(tmp_path):
    with shmwriter.Writer(tmp_path / "out.rtdc", SCHEMA, write_threshold=1,
                          flush_interval_s=0.05) as writer:
        producer = writer.producer()
        producer.put(0, events_of(0))
        producer.put(1, events_of(1))
        writer_stats = writer.statistics
        import time
        deadline = time.monotonic() + 10
        while writer_stats().frames_done < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(shmwriter.FrameError, match="frame 0 was already put"):
            producer.put(0, events_of(0))
        producer.close()


def test_frame_too_large_for_the_ring(tmp_path):
    with shmwriter.Writer(tmp_path / "out.rtdc", SCHEMA, total_frames=2, slots=2,
                          slot_events=2) as writer:
        producer = writer.producer()
        with pytest.raises(shmwriter.FrameError, match="frame 0 has 5 events but one frame can "
                                                       "hold at most 4"):
            producer.put(0, good(5))
        producer.put(0, good(4))  # exactly the whole ring
        producer.put(1, None)
        producer.close()


def test_full_ring_times_out_with_figures(tmp_path):
    with shmwriter.Writer(tmp_path / "out.rtdc", SCHEMA, total_frames=2, slots=2,
                          slot_events=1) as writer:
        holder, waiter = writer.producer(), writer.producer()
        with holder.frame(0, 2) as ev:  # holds both slots
            for name, array in good(2).items():
                ev[name][:] = array
            with pytest.raises(shmwriter.RingFullError,
                               match=r"frame 1: waited 0.3 s for 1 free slot\(s\); 2 of 2 slots "
                                     r"are in use"):
                waiter.put(1, good(1), timeout_s=0.3)
            with pytest.raises(shmwriter.RingFullError):
                waiter.put_nowait(1, good(1))
        waiter.put(1, good(1))  # the slots came back
        holder.close()
        waiter.close()
    assert writer.written_events == 3


def test_frame_context_exception_sends_nothing(tmp_path):
    with shmwriter.Writer(tmp_path / "out.rtdc", SCHEMA, total_frames=1, slots=1) as writer:
        producer = writer.producer()
        with pytest.raises(RuntimeError, match="camera hiccup"):
            with producer.frame(0, 1) as ev:
                ev["area"][:] = 7
                raise RuntimeError("camera hiccup")
        with producer.frame(0, 1) as ev:  # the same slot is reused
            for name, array in good(1).items():
                ev[name][:] = array
            ev["area"][:] = 8
            kept = ev["area"]
        with pytest.raises(ValueError, match="read-only"):
            kept[:] = 9  # the view is frozen once the frame is sent
        producer.close()
    with h5py.File(tmp_path / "out.rtdc") as h5:
        assert h5["events"]["area"][:].tolist() == [8]


def test_closed_producer(tmp_path):
    with shmwriter.Writer(tmp_path / "out.rtdc", SCHEMA, total_frames=1) as writer:
        producer = writer.producer()
        producer.put(0, None)
        producer.close()
        producer.close()
        with pytest.raises(shmwriter.ClosedError, match="was closed"):
            producer.put(0, None)
        with pytest.raises(shmwriter.ClosedError, match="cannot be pickled"):
            pickle.dumps(producer)
        assert "closed" in repr(producer)


def test_put_after_the_run_finished(tmp_path):
    with shmwriter.Writer(tmp_path / "out.rtdc", SCHEMA, total_frames=1, slots=1) as writer:
        producer = writer.producer()
        producer.put(0, good(1))
    with pytest.raises((shmwriter.ClosedError, shmwriter.BrokenError)):
        producer.put(0, good(1))


def test_put_nowait_with_free_slots_goes_in_at_once(tmp_path):
    """The writer answers a put_nowait at once (REQUEST_NOW): granted if slots are free, a
    RingFullError at once if not, never a miss for want of a round trip."""
    with shmwriter.Writer(tmp_path / "out.rtdc", SCHEMA, total_frames=3, slots=2,
                          slot_events=1) as writer:
        holder, waiter = writer.producer(), writer.producer()
        waiter.put_nowait(0, good(1))  # a fresh producer holds no slot: it asks and gets one
        with holder.frame(1, 2) as ev:  # holds both slots (once frame 0 left its slot)
            for name, array in good(2).items():
                ev[name][:] = array
            with pytest.raises(shmwriter.RingFullError, match=r"frame 2: waited 0\.0 s"):
                waiter.put_nowait(2, good(1))
        waiter.put(2, good(1))
        holder.close()
        waiter.close()
    assert writer.written_frames == 3 and writer.written_events == 4
