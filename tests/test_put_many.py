"""put_many: a batch of frames, checked once, copied into one run of slots (one copy per
feature) and sent as one PACKED descriptor (or a few)."""

from __future__ import annotations

import logging
import os
import struct

import h5py
import numpy as np
import pytest
from _workers import SCHEMA, assert_file_holds, batch_of, events_of, put_batches, run_workers

import shmwriter
from shmwriter._channel.records import Kind, encode_packed, encode_record


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_batches_from_spawned_producers_mixed_with_put(tmp_path, mode):
    """Two producers, batches of 25 in shuffled order, frames spanning slots, empty frames
    inside batches, every third batch put frame by frame."""
    path, frames = tmp_path / "out.rtdc", 600
    order = np.random.default_rng(3).permutation(frames).tolist()
    shares = [sorted(order[k::2]) for k in range(2)]
    with shmwriter.Writer(path, SCHEMA, total_frames=frames, slots=16, slot_events=2,
                          write_threshold=50, mode=mode) as writer:
        run_workers(writer, shares, target=put_batches, most=5, batch=25)
    assert writer.written_frames == frames
    assert_file_holds(path, range(frames), most=5)


def test_a_batch_larger_than_the_ring_goes_in_parts(tmp_path):
    path, frames = tmp_path / "out.rtdc", 300
    with shmwriter.Writer(path, SCHEMA, total_frames=frames, slots=8, slot_events=2) as writer:
        with writer.producer() as producer:
            counts, events = batch_of(list(range(frames)), 5)
            producer.put_many(list(range(frames)), counts, events)
            assert producer.frames_put == frames
    assert_file_holds(path, range(frames), most=5)


def test_a_batch_of_empty_frames_needs_no_events(tmp_path):
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, SCHEMA, total_frames=50) as writer:
        with writer.producer() as producer:
            producer.put_many(np.arange(50), np.zeros(50, int), None)
    assert writer.written_frames == 50 and writer.written_events == 0


def test_one_descriptor_per_batch(tmp_path):
    path, frames = tmp_path / "out.rtdc", 100
    with shmwriter.Writer(path, SCHEMA, total_frames=frames, slots=256) as writer:
        with writer.producer() as producer:
            counts, events = batch_of(list(range(frames)))
            producer.put_many(list(range(frames)), counts, events)
            stats = writer.statistics()
    # per-frame put() sends a 20 B descriptor (plus requests) for every frame
    assert stats.descriptor_nbytes < frames * 20, stats.descriptor_nbytes
    assert_file_holds(path, range(frames))


def bad_batches():
    frames = list(range(10, 20))
    counts, events = batch_of(frames)
    wrong_shape = dict(events, image=events["image"][:, :4])
    short = dict(events, deform=events["deform"][:-1])
    extra = dict(events, volume=events["deform"])
    return [
        (frames, counts, wrong_shape, "feature 'image' has shape", "image", 10),
        (frames, counts, short, "feature 'deform' has", "deform", 10),
        (frames, counts, extra, "unknown feature 'volume'", "volume", 10),
        (frames, [*counts[:-1], counts[-1] + 1], events, "nevents adds up to", "area", 10),
        ([*frames[:5], 500, *frames[6:]], counts, events, "frame index 500 is out of range",
         None, 500),
        ([*frames[:5], 12, *frames[6:]], counts, events, "frame 12 is in the batch twice",
         None, 12),
        (frames, [*counts[:3], -1, *counts[4:]], events, "nevents must be an int >= 0", None,
         13),
    ]


@pytest.mark.parametrize(("frames", "counts", "events", "match", "feature", "frame"),
                         bad_batches())
def test_a_bad_batch_is_refused_as_a_whole(tmp_path, frames, counts, events, match, feature,
                                           frame):
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, SCHEMA, total_frames=30, slots=8) as writer:
        with writer.producer() as producer:
            with pytest.raises(shmwriter.FrameError, match=match) as info:
                producer.put_many(frames, counts, events)
            assert info.value.frame_index == frame
            if feature is not None and feature != "area":
                assert info.value.feature == feature
            assert producer.frames_put == 0  # nothing of it was sent
            # so every frame can still be put, and the run goes on
            good = list(range(30))
            good_counts, good_events = batch_of(good)
            producer.put_many(good, good_counts, good_events)
    assert_file_holds(path, range(30))


def test_a_frame_put_already_refuses_the_batch(tmp_path):
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, SCHEMA, total_frames=10) as writer:
        with writer.producer() as producer:
            producer.put(4, events_of(4))
            counts, events = batch_of(list(range(10)))
            with pytest.raises(shmwriter.FrameError, match="frame 4 was already put"):
                producer.put_many(list(range(10)), counts, events)
            rest = [f for f in range(10) if f != 4]
            counts, events = batch_of(rest)
            producer.put_many(rest, counts, events)
    assert_file_holds(path, range(10))


@pytest.mark.parametrize(("record", "why"), [
    (encode_packed([(3, 2), (4, 1)], 0), "sent a packed batch in slots 0..0 that were not granted"),
    (encode_record(Kind.REQUEST, -5, nevents=1), "asked for slots for frame -5, out of range"),
    (encode_record(Kind.REQUEST_RUN, 1, nevents=3), "asked for 3 slots"),  # a run: half at most
    (struct.pack("<BxHIq", Kind.PACKED, 0, 10**6, 0), "sent a record larger than one write"),
], ids=["slots-not-granted", "request-out-of-range", "run-too-long", "record-too-large"])
def test_a_forged_batch_refuses_its_sender_and_the_run_goes_on(tmp_path, caplog, record, why):
    caplog.set_level(logging.ERROR, logger="shmwriter")
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, SCHEMA, total_frames=10, slots=4) as writer:
        forger, honest = writer.producer(), writer.producer()
        forger.put(0, None)  # says HELLO
        os.write(forger._link.desc_fd, record)
        with pytest.raises(shmwriter.BrokenError, match=f"refused this producer: producer 0 "
                                                        f"{why}"):
            forger.put(1, events_of(1), timeout_s=10)  # has events: it asks for a slot
        counts, events = batch_of(list(range(1, 10)))
        honest.put_many(list(range(1, 10)), counts, events)
        forger.close()
        honest.close()
    assert any(why in r.getMessage() for r in caplog.records)
    assert_file_holds(path, range(10))


def test_a_frame_too_large_for_a_run_goes_as_put_and_one_too_large_for_any_is_refused(
        tmp_path):
    """A frame needing more than half the ring cannot share a run: it goes alone, in any
    slots, as put() sends it. One needing more slots than a record can list is a
    FrameError that keeps no slot."""
    schema = shmwriter.Schema({"area": shmwriter.Feature("int64")})
    with shmwriter.Writer(tmp_path / "out.rtdc", schema, total_frames=5, slots=2048,
                          slot_events=1, mode="thread") as writer:
        with writer.producer() as producer:
            with pytest.raises(shmwriter.FrameError, match="frame 0 has 1021 events but one "
                                                           "frame can hold at most 1020"):
                producer.put_many([0], [1021], {"area": np.arange(1021)})
            assert producer._grants.unused == []  # nothing was taken for it
            counts = [3, 1020, 2, 1000, 0]
            producer.put_many(range(5), counts, {"area": np.arange(sum(counts))})
    assert writer.written_events == sum(counts)
    assert_file_holds_areas(tmp_path / "out.rtdc", np.arange(sum(counts)))


def assert_file_holds_areas(path, areas):
    with h5py.File(path, "r") as h5:
        np.testing.assert_array_equal(h5["events"]["area"][:], areas)


def test_batches_at_the_frontier_ahead_of_it_and_over_chunk_bounds(tmp_path):
    """A batch from the frontier on is taken whole (cut into chunks at write_threshold),
    one ahead of the frontier waits, one out of order goes frame by frame."""
    path, frames = tmp_path / "out.rtdc", 60
    with shmwriter.Writer(path, SCHEMA, total_frames=frames, slots=64, slot_events=2,
                          write_threshold=7) as writer:
        with writer.producer() as producer:
            for block in ([*range(0, 23)], [*range(40, 45)], [*range(30, 36)],
                          [*range(23, 30)], [*range(36, 40)], [52, 45, 59, *range(46, 52),
                                                               *range(53, 59)]):
                counts, events = batch_of(block, 4)
                producer.put_many(block, counts, events)
    assert writer.written_frames == frames and not writer.missing_frames
    assert_file_holds(path, range(frames), most=4)


def test_a_packed_record_of_no_frames_changes_nothing(tmp_path):
    """A PACKED record listing no frames (no honest producer sends one) is taken as nothing."""
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, SCHEMA, total_frames=3, slots=4) as writer:
        with writer.producer() as producer:
            producer.put(0, None)  # says HELLO
            os.write(producer._link.desc_fd, encode_packed([], 0))
            counts, events = batch_of([1, 2])
            producer.put_many([1, 2], counts, events)
    assert writer.written_frames == 3 and not writer.missing_frames


def test_masks_whose_true_bytes_are_not_1_are_stored_as_255(tmp_path):
    """numpy takes any non-zero byte of a bool array as True (a 0/255 mask viewed as bool,
    bools read from a buffer): put, put_many and frame() store every True as 255."""
    schema = shmwriter.Schema({"mask": shmwriter.Feature("bool", (1, 5)),
                               "x": shmwriter.Feature("float64")})
    raw = np.array([[[0, 255, 2, 1, 128]]], np.uint8)
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, schema, total_frames=3, mode="thread") as writer:
        with writer.producer() as producer:
            producer.put(0, {"mask": raw.view(bool), "x": np.zeros(1)})
            producer.put_many([1], [1], {"mask": raw.view(bool), "x": np.zeros(1)})
            with producer.frame(2, 1) as events:
                events["mask"][...] = raw.view(bool)
                events["x"][...] = 0
    with h5py.File(path, "r") as h5:
        assert h5["events"]["mask"][:].tolist() == [[[0, 255, 255, 255, 255]]] * 3


def test_put_many_with_no_timeout_is_granted_at_once_when_slots_are_free(tmp_path):
    """timeout_s=0 asks for the run as put() asks for its slots: answered at once."""
    frames = 40
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, SCHEMA, total_frames=frames, slots=64) as writer:
        with writer.producer() as producer:
            for frame in range(frames):
                counts, events = batch_of([frame])
                producer.put_many([frame], counts, events, timeout_s=0)
    assert_file_holds(path, range(frames))


def test_more_kept_slots_than_one_record_lists_go_back_in_several(tmp_path):
    """A frames() block of 1500 slots that raised keeps them (more than one RELEASE record
    can list): the next put_many gives them back in several records and goes on."""
    schema = shmwriter.Schema({"area": shmwriter.Feature("int32")})
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, schema, total_frames=302, slots=4096, slot_events=1,
                          mode="thread") as writer:
        with writer.producer() as producer:
            with pytest.raises(RuntimeError, match="camera hiccup"):
                with producer.frames(list(range(2, 302)), [5] * 300):
                    raise RuntimeError("camera hiccup")
            assert len(producer._grants.unused) == 1500
            producer.put_many([0, 1], [3, 4], {"area": np.arange(7, dtype=np.int32)})
            producer.put_many(list(range(2, 302)), [1] * 300,
                              {"area": np.arange(7, 307, dtype=np.int32)})
    assert_file_holds_areas(path, np.arange(307))
