"""ChunkGatherer: frames in frame order become contiguous chunk arrays."""

from __future__ import annotations

import numpy as np

import shmwriter
from shmwriter._gather import ChunkGatherer
from shmwriter._ring import SlotRing
from shmwriter._spec import SlotLayout

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
            frames.append((frame, nevents, slots))
            for name, array in events.items():
                expected[name].append(array)
        gatherer = ChunkGatherer(SCHEMA, ("frame", "nevents"))
        gatherer.append_from_ring(frames[:2], ring.feature_views())
        private = {"img": np.full((1, 16, 20), 7, np.uint8),
                   "mask": np.zeros((1, 16, 20), np.uint8), "x": np.array([0.5])}
        gatherer.append(4, 1, [(private, 1)])  # a frame copied out of the ring earlier
        gatherer.skip(2)  # two missing frames
        gatherer.append_from_ring(frames[2:], ring.feature_views())
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
