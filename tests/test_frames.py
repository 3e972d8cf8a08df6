"""Producer.frames: a batch of frames filled in place in shared memory, sent as one record."""

from __future__ import annotations

import logging
import os
import re

import h5py
import numpy as np
import pytest
from _workers import (
    SCHEMA,
    assert_file_holds,
    batch_of,
    events_of,
    fill_batches_in_place,
    run_workers,
)

import shmwriter
from shmwriter._channel.records import encode_packed


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_batches_filled_in_place_by_spawned_producers_mix_with_put_and_put_many(tmp_path,
                                                                                mode):
    """Two producers, batches of 20 in shuffled order spanning many slots, empty frames
    inside batches, frames larger than a slot, all three ways of putting on one producer."""
    path, frames = tmp_path / "out.rtdc", 480
    order = np.random.default_rng(5).permutation(frames).tolist()
    shares = [sorted(order[k::2]) for k in range(2)]
    with shmwriter.Writer(path, SCHEMA, total_frames=frames, slots=64, slot_events=2,
                          write_threshold=40, mode=mode) as writer:
        run_workers(writer, shares, target=fill_batches_in_place, most=5, batch=20)
    assert writer.written_frames == frames and not writer.missing_frames
    assert_file_holds(path, range(frames), most=5)


def test_the_arrays_are_contiguous_views_of_the_ring(tmp_path):
    path = tmp_path / "out.rtdc"
    frames = [7, 3, 5, 4]  # any order; 4 has no events
    counts = [3, 2, 4, 0]
    with shmwriter.Writer(path, SCHEMA, total_frames=10, slots=16, slot_events=2,
                          allow_gaps=True) as writer:
        with writer.producer() as producer:
            with producer.frames(frames, counts) as ev:
                rows = producer._attached_ring().row_views()
                for name, feature in SCHEMA.items():
                    array = ev[name]
                    assert array.shape == (9, *feature.shape) and array.dtype == feature.dtype
                    assert array.flags.c_contiguous and array.flags.writeable
                    assert np.shares_memory(array, rows[name])  # no private copy
                events = {"image": np.arange(9 * 80, dtype=np.uint8).reshape(9, 8, 10),
                          "mask": np.arange(9 * 80).reshape(9, 8, 10) % 3 == 0,
                          "deform": np.linspace(0, 1, 9, dtype=np.float32),
                          "area": np.arange(9, dtype=np.int64)}
                for name, array in events.items():
                    ev[name][:] = array
            assert not ev["area"].flags.writeable
            assert producer.frames_put == 4 and producer.events_put == 9
    with h5py.File(path, "r") as h5:
        stored = h5["events"]
        order = np.argsort(frames, kind="stable")  # the file is in frame order
        starts = np.concatenate([[0], np.cumsum(counts)])
        rows_in_file = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in order])
        np.testing.assert_array_equal(stored["area"][:], events["area"][rows_in_file])
        np.testing.assert_array_equal(stored["image"][:], events["image"][rows_in_file])
        np.testing.assert_array_equal(stored["mask"][:].astype(bool),
                                      events["mask"][rows_in_file])
        assert set(np.unique(stored["mask"][:])) <= {0, 255}  # as .rtdc files store masks
        assert stored["frame"][:].tolist() == [3, 3, 5, 5, 5, 5, 7, 7, 7]


def test_an_exception_in_the_block_sends_nothing_and_the_frames_can_be_put_again(tmp_path):
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, SCHEMA, total_frames=20, slots=16, slot_events=2) as writer:
        with writer.producer() as producer:
            counts, events = batch_of(list(range(10)))
            with pytest.raises(RuntimeError, match="segmentation failed"):
                with producer.frames(list(range(10)), counts):
                    raise RuntimeError("segmentation failed")
            assert producer.frames_put == 0
            with producer.frames(list(range(10)), counts) as ev:
                for name, array in (events or {}).items():
                    ev[name][:] = array
            for frame in range(10, 20):
                producer.put(frame, events_of(frame))
    assert_file_holds(path, range(20))


def bad_batches():
    frames = list(range(10, 20))
    counts, _ = batch_of(frames)
    return [
        ([*frames[:5], 500, *frames[6:]], counts, shmwriter.FrameError,
         "frame index 500 is out of range"),
        ([*frames[:5], 12, *frames[6:]], counts, shmwriter.FrameError,
         "frame 12 is in the batch twice"),
        (frames, [*counts[:3], -1, *counts[4:]], shmwriter.FrameError,
         "nevents must be an int >= 0"),
        (frames, [9] * 10, shmwriter.FrameError,
         r"45 slots, more than half of the ring's 8; .* slots >= 2 x producers x 45"),
        (frames, counts[:-1], ValueError, "must be as long as each other"),
    ]


@pytest.mark.parametrize(("frames", "counts", "error", "match"), bad_batches())
def test_a_bad_batch_is_refused_as_a_whole(tmp_path, frames, counts, error, match):
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, SCHEMA, total_frames=30, slots=8, slot_events=2) as writer:
        with writer.producer() as producer:
            with pytest.raises(error, match=match):
                with producer.frames(frames, counts):
                    pytest.fail("the block must not run for a bad batch")
            assert producer.frames_put == 0
            good = list(range(30))
            good_counts, good_events = batch_of(good)
            producer.put_many(good, good_counts, good_events)
    assert_file_holds(path, range(30))


def test_more_frames_than_one_record_carries_is_refused(tmp_path):
    with shmwriter.Writer(tmp_path / "out.rtdc", SCHEMA, total_frames=400) as writer:
        with writer.producer() as producer:
            with pytest.raises(ValueError, match="at most 340 frames; got 341"):
                with producer.frames(list(range(341)), [0] * 341):
                    pass
            producer.put_many(list(range(400)), [0] * 400, None)


def test_a_frame_put_already_refuses_the_batch(tmp_path):
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, SCHEMA, total_frames=10) as writer:
        with writer.producer() as producer:
            producer.put(4, events_of(4))
            counts, _ = batch_of(list(range(10)))
            with pytest.raises(shmwriter.FrameError, match="frame 4 was already put"):
                with producer.frames(list(range(10)), counts):
                    pass
            rest = [f for f in range(10) if f != 4]
            counts, events = batch_of(rest)
            with producer.frames(rest, counts) as ev:
                for name, array in (events or {}).items():
                    ev[name][:] = array
    assert_file_holds(path, range(10))


def test_a_run_of_slots_waits_for_frames_ahead_to_be_written(tmp_path):
    """Frames far ahead fill the ring; a batch for the frontier needs a run: the writer
    copies frames out (or waits for them to be written) until one is free."""
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, SCHEMA, total_frames=40, slots=16, slot_events=2) as writer:
        with writer.producer() as ahead, writer.producer() as front:
            for frame in range(20, 40):
                ahead.put(frame, events_of(frame))
            counts, events = batch_of(list(range(20)))
            for at in range(0, 20, 5):
                block = list(range(at, at + 5))
                with front.frames(block, counts[at:at + 5]) as ev:
                    start = sum(counts[:at])
                    for name, array in (events or {}).items():
                        ev[name][:] = array[start:start + sum(counts[at:at + 5])]
    assert_file_holds(path, range(40))


@pytest.mark.parametrize(("record", "slots"), [
    (encode_packed([(3, 2), (4, 1)], 2), "2..3"),  # slots never granted
    (encode_packed([(3, 2**32 - 1)] * 340, 0), "0..730144440149"),  # far beyond the ring
], ids=["slots-not-granted", "beyond-the-ring"])
def test_a_forged_packed_batch_refuses_its_sender_and_the_run_goes_on(tmp_path, caplog, record,
                                                                     slots):
    caplog.set_level(logging.ERROR, logger="shmwriter")
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, SCHEMA, total_frames=10, slots=4, slot_events=2) as writer:
        forger, honest = writer.producer(), writer.producer()
        forger.put(0, None)  # says HELLO
        os.write(forger._link.desc_fd, record)
        with pytest.raises(shmwriter.BrokenError, match=rf"refused this producer: producer 0 "
                                                        rf"sent a packed batch in slots "
                                                        rf"{re.escape(slots)}"):
            forger.put(1, events_of(1), timeout_s=10)
        counts, events = batch_of(list(range(1, 10)))
        honest.put_many(list(range(1, 10)), counts, events)
        forger.close()
        honest.close()
    assert_file_holds(path, range(10))


def test_frames_with_no_timeout_is_answered_at_once(tmp_path):
    """timeout_s=0: the run when it is free now, a RingFullError at once when it is not."""
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, SCHEMA, total_frames=4, slots=10, slot_events=1,
                          mode="thread") as writer:
        with (writer.producer() as producer, writer.producer() as first,
              writer.producer() as second):
            with producer.frames([2], [1], timeout_s=0) as events:  # the ring is empty
                fill(events, 2)
            with first.frames([0], [4]) as held, second.frames([1], [4]) as held_too:
                with pytest.raises(shmwriter.RingFullError, match="frame 3"):  # 1 free, 2 asked
                    with producer.frames([3], [2], timeout_s=0):
                        pass
                fill(held, 0)
                fill(held_too, 1)
            with producer.frames([3], [2]) as events:
                fill(events, 3)
    assert writer.written_frames == 4 and writer.written_events == 11


def fill(events, value):
    for array in events.values():
        array[...] = value
