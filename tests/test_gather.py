"""ChunkGatherer: frames in frame order become chunk columns, plain or laid out as stored."""

from __future__ import annotations

import numpy as np
import pytest

import shmwriter
from shmwriter._ring.ring import SlotRing
from shmwriter._spec import SlotLayout
from shmwriter._write.columns import ColumnLayout
from shmwriter._write.gather import ChunkGatherer, plain_layouts

SCHEMA = shmwriter.Schema({"img": shmwriter.Feature("uint8", (16, 20)),
                           "mask": shmwriter.Feature("bool", (16, 20)),
                           "x": shmwriter.Feature("float64")})


def stored_layouts(schema, derived, chunk_rows):
    """Every column stored, in HDF5 chunks of ``chunk_rows`` rows (small: boundaries crossed)."""
    return {name: ColumnLayout(layout.shape, layout.dtype, chunk_rows)
            for name, layout in plain_layouts(schema, derived).items()}


LAYOUTS = pytest.mark.parametrize("chunk_rows", [None, 2, 3], ids=["plain", "stored2", "stored3"])


def gatherer_for(schema, derived, chunk_rows):
    layouts = None if chunk_rows is None else stored_layouts(schema, derived, chunk_rows)
    return ChunkGatherer(schema, derived, layouts)


@LAYOUTS
def test_batches_from_the_ring_and_private_frames_keep_frame_order(chunk_rows):
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
        gatherer = gatherer_for(SCHEMA, ("frame", "nevents"), chunk_rows)
        gatherer.append_from_ring(frames[:2], ring.row_views())
        private = {"img": np.full((1, 16, 20), 7, np.uint8),
                   "mask": np.zeros((1, 16, 20), np.uint8), "x": np.array([0.5])}
        gatherer.append(4, 1, private)  # a frame copied out of the ring earlier
        gatherer.skip(2)  # two missing frames
        gatherer.append_from_ring(frames[2:], ring.row_views())
        chunk = gatherer.take()
        arrays = chunk.arrays()
        order = [0, 1, 4, 2, 3]  # the order the frames were appended in
        for name in ("img", "mask", "x"):
            parts = {0: expected[name][0], 1: expected[name][1], 4: private[name],
                     2: expected[name][2], 3: expected[name][3]}
            np.testing.assert_array_equal(arrays[name],
                                          np.concatenate([parts[f] for f in order]))
        assert arrays["frame"].tolist() == [0, 0, 0, 4, 2, 3, 3]
        assert arrays["nevents"].tolist() == [3, 3, 3, 1, 1, 2, 2]
        assert (chunk.nframes, chunk.nmissing, chunk.nevents) == (7, 2, 7)
        assert arrays["mask"].dtype == np.uint8
        assert gatherer.take().nevents == 0  # a fresh chunk starts after the last
    finally:
        ring.close()
        ring.unlink()


@LAYOUTS
def test_pieces_that_touch_are_copied_as_one_and_scattered_ones_by_index(chunk_rows):
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
        gatherer = gatherer_for(schema, ("frame",), chunk_rows)
        gatherer.append_from_ring(packed, rows)
        gatherer.append_from_ring(scattered, rows)
        chunk = gatherer.take()
        arrays = chunk.arrays()
        expected = [*range(4, 12), 30, 20, 21, 0, 16, 24, 25]
        assert arrays["x"].tolist() == expected
        assert arrays["img"][:, 3, 4].tolist() == expected
        assert arrays["frame"].tolist() == [0, 0, 0, 2, 2, 2, 2, 2, 3, 4, 4, 5, 6, 7, 7]
        assert (chunk.nframes, chunk.nevents) == (8, 15)
    finally:
        ring.close()
        ring.unlink()


def test_stored_columns_start_at_a_chunk_boundary_carry_the_last_rows_and_are_reused():
    """Each chunk's stored columns start at an HDF5 chunk boundary, with the rows of the
    file's last incomplete chunk carried; padding holds the fill value; the bytes after
    each stored chunk are spare; written chunks' columns come back for later chunks."""
    schema = shmwriter.Schema({"x": shmwriter.Feature("int16")})
    layouts = {"x": ColumnLayout((), np.dtype(np.int16), 4, fill=-1),
               "frame": ColumnLayout((), np.dtype(np.uint32), 4)}
    gatherer = ChunkGatherer(schema, ("frame",), layouts)
    values = iter(range(100, 200))
    chunks, frame, file_rows = [], 0, 0
    for nevents in [6, 5, 4, 1]:
        for _ in range(nevents):
            gatherer.append(frame, 1, {"x": np.array([next(values)], np.int16)})
            frame += 1
        chunk = gatherer.take()
        column = chunk.columns["x"]
        assert chunk.first_row == file_rows and chunk.nevents == nevents
        assert column.base_row == file_rows - file_rows % 4
        assert column.carried == file_rows % 4
        file_rows += nevents
        expected = np.arange(100 + column.base_row, 100 + file_rows, dtype=np.int16)
        np.testing.assert_array_equal(column.values(), expected)
        stored = column.stored_chunks()
        assert [row for row, _ in stored] == list(range(column.base_row, file_rows, 4))
        held = np.concatenate([data[:-4].view(np.int16) for _, data in stored])
        padding = len(held) - len(expected)
        np.testing.assert_array_equal(held, np.concatenate([expected, [-1] * padding]))
        assert all(len(data) == 4 * 2 + 4 for _, data in stored)
        chunks.append(chunk)
        if len(chunks) >= 2:
            gatherer.recycle(chunks[-2])  # written: its columns may come back
    assert chunks[2].columns["x"] is chunks[0].columns["x"]  # back before chunk 2 began


def test_columns_grow_past_their_first_capacity_keeping_their_rows():
    schema = shmwriter.Schema({"img": shmwriter.Feature("uint8", (3, 5))})
    for chunk_rows in (None, 7):
        gatherer = gatherer_for(schema, ("nevents",), chunk_rows)
        images = np.arange(300 * 15, dtype=np.uint64).astype(np.uint8).reshape(300, 3, 5)
        for frame in range(100):
            gatherer.append(frame, 3, {"img": images[3 * frame:3 * frame + 3]})
        arrays = gatherer.take().arrays()
        np.testing.assert_array_equal(arrays["img"], images)
        assert arrays["nevents"].tolist() == [3] * 300


def test_columns_come_back_while_the_sink_is_behind_and_no_more_sets_are_made():
    """The writer's pattern when the disk is the bottleneck: one chunk being written, one
    queued, one waiting to be queued. The written chunk's columns serve the next chunk, so
    no more than three sets of columns ever exist (gathered, queued, written)."""
    schema = shmwriter.Schema({"x": shmwriter.Feature("int16")})
    layouts = {"x": ColumnLayout((), np.dtype(np.int16), 4),
               "frame": ColumnLayout((), np.dtype(np.uint32), 4)}
    gatherer = ChunkGatherer(schema, ("frame",), layouts)
    out, made, frame = [], set(), 0
    for _ in range(12):
        for _ in range(5):
            gatherer.append(frame, 1, {"x": np.array([frame], np.int16)})
            frame += 1
        out.append(gatherer.take())
        made.add(id(out[-1].columns["x"]))
        if len(out) == 3:  # the third waits for the queue: the first is written meanwhile
            gatherer.recycle(out.pop(0))
    assert len(made) == 3
    chunk = out[-1]
    np.testing.assert_array_equal(chunk.columns["x"].values(chunk.columns["x"].carried),
                                  np.arange(frame - 5, frame))


def test_a_chunk_written_before_the_next_event_lends_it_its_columns_and_last_rows():
    """A sink that keeps up returns a chunk's columns before the next chunk's first event:
    the next chunk gathers into them, starting with the rows of their last incomplete
    stored chunk (10 rows in chunks of 4: rows 8 and 9 are carried, moved to the front)."""
    schema = shmwriter.Schema({"x": shmwriter.Feature("int16")})
    layouts = {"x": ColumnLayout((), np.dtype(np.int16), 4),
               "frame": ColumnLayout((), np.dtype(np.uint32), 4)}
    gatherer = ChunkGatherer(schema, ("frame",), layouts)
    first_column, frame = None, 0
    for _ in range(3):
        for _ in range(10):
            gatherer.append(frame, 1, {"x": np.array([frame], np.int16)})
            frame += 1
        chunk = gatherer.take()
        column = chunk.columns["x"]
        first_column = first_column or column
        assert column is first_column
        assert column.base_row == (frame - 10) - (frame - 10) % 4
        np.testing.assert_array_equal(column.values(), np.arange(column.base_row, frame))
        stored = np.concatenate([data[:-4].view(np.int16) for _, data in column.stored_chunks()])
        np.testing.assert_array_equal(stored[:frame - column.base_row],
                                      np.arange(column.base_row, frame))
        gatherer.recycle(chunk)


@pytest.mark.parametrize("chunk_rows", [None, 4], ids=["plain", "stored4"])
def test_chunks_that_vary_in_size_map_each_column_once(monkeypatch, chunk_rows):
    """Chunks of 30 to 64 events (first_room_events) with the sink's pattern of three
    out: every column is mapped once, at its set's making, and never grows (growing
    copies the rows into fresh pages, which cost four times a copy into warm ones)."""
    from shmwriter._write import columns as columns_module
    mapped = []
    real = columns_module._anonymous_bytes

    def counting(nbytes):
        mapped.append(nbytes)
        return real(nbytes)

    monkeypatch.setattr(columns_module, "_anonymous_bytes", counting)
    schema = shmwriter.Schema({"x": shmwriter.Feature("int16"),
                               "img": shmwriter.Feature("uint8", (4, 5))})
    gatherer = ChunkGatherer(schema, ("frame",), None if chunk_rows is None else
                             stored_layouts(schema, ("frame",), chunk_rows),
                             first_room_events=64)
    out, frame, values = [], 0, []
    for nevents in [30, 64, 45, 64, 33, 50, 64, 41, 64, 58, 36, 64]:
        for _ in range(nevents):
            gatherer.append(frame, 1, {"x": np.array([frame], np.int16),
                                       "img": np.full((1, 4, 5), frame % 256, np.uint8)})
            values.append(frame)
            frame += 1
        out.append(gatherer.take())
        if len(out) == 3:
            gatherer.recycle(out.pop(0))
    assert len(mapped) == 3 * 3  # three sets of x, img and frame
    chunk = out[-1]
    column = chunk.columns["x"]
    np.testing.assert_array_equal(column.values(column.carried), values[-64:])
