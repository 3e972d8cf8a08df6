"""ChunkGatherer: frames in frame order become contiguous chunk arrays."""

from __future__ import annotations

import numpy as np

import shmwriter
from shmwriter._ring.ring import SlotRing
from shmwriter._spec import SlotLayout
from shmwriter._write.gather import ChunkGatherer

SCHEMA = shmwriter.Schema({"img": shmwriter.Feature("uint8", (16, 20)),
                           "mask": shmwriter.Feature("bool", (16, 20)),
                           "x": shmwriter.Feature("float64")})


def test_batches_from_the_ring_and_private_frames_keep_frame_order():
    ring = SlotRing.create(SlotLayout(schema=SCHEMA, slot_events=2), 6, None)
    try:
        rng = np.random.default_rng(1)
        frames, expected = [], {"img": [], "mask": [], "x": []}
        slot = 0
        for frame, nevents in enumerate([3, 0, 1, 2]):  # frame 0 spans two slots
            events = {"img": rng.integers(0, 256, (nevents, 16, 20), dtype=np.uint8),
                      "mask": rng.integers(0, 2, (nevents, 16, 20), dtype=np.uint8) * 255,
                      "x": rng.random(nevents)}
            slots = list(range(slot, slot + -(-nevents // 2)))
            slot += len(slots)
            for j, s in enumerate(slots):
                views = ring.slot_views(s, 2, as_stored=True)
                for name, array in events.items():
                    part = array[2 * j:2 * j + 2]
                    views[name][:len(part)] = part
            rows = [(s * 2, min(2, nevents - 2 * j)) for j, s in enumerate(slots)]
            frames.append((frame, nevents, rows))
            for name, array in events.items():
                expected[name].append(array)
        gatherer = ChunkGatherer(SCHEMA, ("frame", "nevents"))
        gatherer.append_from_ring(frames[:2], ring.row_views())
        private = {"img": np.full((1, 16, 20), 7, np.uint8),
                   "mask": np.zeros((1, 16, 20), np.uint8), "x": np.array([0.5])}
        gatherer.append(4, 1, private)  # a frame copied out of the ring earlier
        gatherer.skip(2)  # two missing frames
        gatherer.append_from_ring(frames[2:], ring.row_views())
        chunk = gatherer.take()
        order = [0, 1, 4, 2, 3]  # the order the frames were appended in
        for name in ("img", "mask", "x"):
            parts = {0: expected[name][0], 1: expected[name][1], 4: private[name],
                     2: expected[name][2], 3: expected[name][3]}
            np.testing.assert_array_equal(chunk.arrays[name],
                                          np.concatenate([parts[f] for f in order]))
        assert chunk.arrays["frame"].tolist() == [0, 0, 0, 4, 2, 3, 3]
        assert chunk.arrays["nevents"].tolist() == [3, 3, 3, 1, 1, 2, 2]
        assert (chunk.nframes, chunk.nmissing, chunk.nevents) == (7, 2, 7)
        assert chunk.arrays["mask"].dtype == np.uint8
        assert gatherer.take().nevents == 0  # a fresh chunk starts after the last
    finally:
        ring.close()
        ring.unlink()


def test_pieces_that_touch_are_copied_as_one_and_scattered_ones_by_index():
    schema = shmwriter.Schema({"x": shmwriter.Feature("int64"),
                               "img": shmwriter.Feature("uint8", (16, 20))})
    ring = SlotRing.create(SlotLayout(schema=schema, slot_events=4), 8, None)
    try:
        rows = ring.row_views()
        rows["x"][:] = np.arange(32)
        rows["img"][:] = (np.arange(32) % 256).astype(np.uint8)[:, None, None]
        packed = [(0, 3, [(4, 3)]), (1, 0, []), (2, 5, [(7, 5)])]       # one run: rows 4..11
        scattered = [(3, 1, [(30, 1)]), (4, 2, [(20, 2)]), (5, 1, [(0, 1)]),
                     (6, 1, [(16, 1)]), (7, 2, [(24, 2)])]               # five pieces
        gatherer = ChunkGatherer(schema, ("frame",))
        gatherer.append_from_ring(packed, rows)
        gatherer.append_from_ring(scattered, rows)
        chunk = gatherer.take()
        expected = [*range(4, 12), 30, 20, 21, 0, 16, 24, 25]
        assert chunk.arrays["x"].tolist() == expected
        assert chunk.arrays["img"][:, 3, 4].tolist() == expected
        assert chunk.arrays["frame"].tolist() == [0, 0, 0, 2, 2, 2, 2, 2, 3, 4, 4, 5, 6, 7, 7]
        assert (chunk.nframes, chunk.nevents) == (8, 15)
    finally:
        ring.close()
        ring.unlink()
