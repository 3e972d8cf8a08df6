"""SlotRing and its segment: creation, attachment, lifetimes, space checks."""

from __future__ import annotations

import mmap
import os
import pickle
import stat

import numpy as np
import pytest

import shmwriter
from shmwriter._queue.segment import (
    _SCHEMA_NBYTES,
    QueueSegment,
    budget_nbytes,
    segment_nbytes,
    slots_that_fit,
)
from shmwriter._ring.ring import (
    HEADER_NBYTES,
    MAX_SLOTS,
    QUEUE_MAGIC,
    RING_MAGIC,
    Field,
    RingSpec,
    SlotRing,
    State,
)
from shmwriter._ring.segment import check_space, create_unlinked_segment
from shmwriter._spec import SlotLayout

SCHEMA = shmwriter.Schema({"img": shmwriter.Feature("uint16", (4, 5)),
                           "v": shmwriter.Feature("float64")})
#: Odd event sizes, so that the blocks need padding between them, and a mask.
ODD = shmwriter.Schema({"x": shmwriter.Feature("uint8", (3,)),
                        "mask": shmwriter.Feature("bool", (2, 3)),
                        "y": shmwriter.Feature("float64")})


@pytest.fixture
def odd_ring():
    ring = SlotRing.create(SlotLayout(schema=ODD, slot_events=3), slots=5, total_frames=7)
    yield ring
    ring.close()
    ring.unlink()


def _fill(views):
    for name, view in views.items():
        view[...] = (np.arange(view.size) % 7 + len(name)).reshape(view.shape) % 2 \
            if view.dtype == bool else (np.arange(view.size) + 10 * len(name)).reshape(view.shape)


def test_create_attach_unlink():
    layout = SlotLayout(schema=SCHEMA, slot_events=3)
    ring = SlotRing.create(layout, slots=4, total_frames=10)
    path = f"/dev/shm/{ring.spec.name}"
    try:
        info = os.stat(path)
        assert stat.S_IMODE(info.st_mode) == 0o600  # owner only
        assert info.st_blocks * 512 >= ring.spec.nbytes  # pages reserved up front
        assert ring.spec.name.startswith(f"shmw_{os.getpid()}_")
        views = ring.slot_views(2, 3)
        views["img"][:] = np.arange(60, dtype=np.uint16).reshape(3, 4, 5)
        ring.set(Field.WRITTEN_EVENTS, 42)
        other = pickle.loads(pickle.dumps(ring))  # attaches by name
        np.testing.assert_array_equal(other.slot_views(2, 3)["img"], views["img"])
        assert other.get(Field.WRITTEN_EVENTS) == 42
        assert other.get(Field.TOTAL_FRAMES) == 10
        other.close()
        other.close()  # idempotent
        assert "closed" in repr(other)
        del views
    finally:
        ring.close()
        ring.unlink()
    assert not os.path.exists(path)
    ring.unlink()  # a second unlink is harmless


def test_text_fields_round_trip():
    ring = SlotRing.create(SlotLayout(schema=SCHEMA, slot_events=1), slots=1, total_frames=None)
    try:
        ring.set_error_text("disk full ✗")
        ring.set_path_text("/data/run.rtdc")
        assert ring.error_text == "disk full ✗"
        assert ring.path_text == "/data/run.rtdc"
        assert ring.get(Field.TOTAL_FRAMES) == -1
        assert ring.spec.claimed_nbytes == 0
    finally:
        ring.close()
        ring.unlink()


def test_space_check_gives_numbers():
    with pytest.raises(shmwriter.ShmSpaceError, match=r"the slot ring needs .* MiB but "
                                                      r"/dev/shm has only .* MiB free"):
        check_space(1 << 50)
    huge = shmwriter.Schema({"frame_image": shmwriter.Feature("uint8", (1000, 1000))})
    with pytest.raises(shmwriter.ShmSpaceError, match=r"needs 39062.5 MiB but"):
        shmwriter.Writer("/tmp/never.rtdc", huge, slots=10, slot_events=4096)
    assert not os.path.exists("/tmp/never.rtdc")


def test_run_views_are_contiguous_across_slots(odd_ring):
    per_slot = odd_ring.spec.layout.slot_events
    run = odd_ring.run_views(1, 3 * per_slot)
    _fill(run)
    pieces = [odd_ring.slot_views(s, per_slot) for s in (1, 2, 3)]
    for name, feature in ODD.items():
        view = run[name]
        assert view.shape == (3 * per_slot, *feature.shape)
        assert view.dtype == feature.dtype
        assert view.flags.c_contiguous and view.flags.writeable
        assert all(np.shares_memory(view, piece[name]) for piece in pieces)
        np.testing.assert_array_equal(view, np.concatenate([p[name] for p in pieces]))
    # a run may end inside its last slot and may start in the last slot
    assert odd_ring.run_views(2, per_slot + 1)["y"].shape == (per_slot + 1,)
    assert odd_ring.run_views(4, per_slot)["x"].shape == (per_slot, 3)
    assert odd_ring.run_views(0, 0)["y"].shape == (0,)


def test_run_views_write_through_to_row_views(odd_ring):
    spec = odd_ring.spec
    per_slot = spec.layout.slot_events
    run = odd_ring.run_views(2, 2 * per_slot + 1)
    _fill(run)
    rows = odd_ring.row_views()
    for name, feature in ODD.items():
        assert rows[name].shape == (spec.slots * per_slot, *feature.shape)
        assert rows[name].dtype == feature.file_dtype
        stored = run[name].view(feature.file_dtype)
        np.testing.assert_array_equal(rows[name][3 * per_slot + 1], stored[per_slot + 1])
        np.testing.assert_array_equal(rows[name][2 * per_slot:4 * per_slot + 1], stored)
    masks = odd_ring.run_views(2, 1, as_stored=True)["mask"]
    assert masks.dtype == np.uint8
    np.testing.assert_array_equal(masks, run["mask"][:1].view(np.uint8))


def test_feature_blocks_do_not_overlap(odd_ring):
    """Filling one feature's block leaves every other block as it was."""
    spec = odd_ring.spec
    everything = odd_ring.run_views(0, spec.slots * spec.layout.slot_events, as_stored=True)
    for view in everything.values():
        view[...] = 0
    everything["x"][...] = 255
    for name, view in odd_ring.row_views().items():
        assert (view == 255).all() if name == "x" else not view.any()
    assert odd_ring.get(Field.TOTAL_FRAMES) == 7  # the header is untouched too


@pytest.mark.parametrize(("first_slot", "nevents", "message"), [
    (3, 7, (r"nevents=7 from first_slot=3 passes the last slot: 5 slots of 3 events leave "
            r"room for 6")),
    (0, 16, r"nevents=16 from first_slot=0 passes the last slot"),
    (5, 1, r"first_slot must be in \[0, 5\); got 5"),
    (-1, 1, r"first_slot must be in \[0, 5\); got -1"),
    (0, -1, r"nevents must be at least 0; got -1"),
])
def test_run_views_refuse_runs_off_the_ring(odd_ring, first_slot, nevents, message):
    with pytest.raises(ValueError, match=message):
        odd_ring.run_views(first_slot, nevents)


def test_slot_views_stay_inside_their_slot(odd_ring):
    with pytest.raises(ValueError, match=r"nevents must be in \[0, 3\] \(slot_events\); got 4"):
        odd_ring.slot_views(0, 4)


def test_ring_region_is_sized_from_the_layout(odd_ring):
    spec = odd_ring.spec
    assert spec.slots_offset == 4096 + 4096  # header, then one page of claimed flags
    assert spec.ring_nbytes == spec.layout.region_nbytes(spec.slots)
    assert spec.nbytes == spec.slots_offset + spec.ring_nbytes


TINY = shmwriter.Schema({"deform": shmwriter.Feature("float64")})


@pytest.mark.parametrize(("schema", "slot_events"), [(ODD, 3), (TINY, 1), (SCHEMA, 4)])
def test_queue_segment_size_gives_back_its_slots(schema, slot_events):
    """Several slot counts share a region's bytes (padding absorbs them), yet the queue's
    segment size must tell a publisher the count its creator asked for."""
    layout = SlotLayout(schema=schema, slot_events=slot_events)
    for slots in [*range(1, 70), 999, 16000]:
        nbytes = segment_nbytes(layout, slots)
        assert slots_that_fit(nbytes, layout) == slots
        assert slots_that_fit(nbytes - 1, layout) == slots - 1
        assert nbytes % 8 == 0
        assert HEADER_NBYTES + layout.region_nbytes(slots) <= nbytes - _SCHEMA_NBYTES


def test_queue_segment_binds_the_bytes_it_sized():
    layout = SlotLayout(schema=ODD, slot_events=3)
    nbytes = segment_nbytes(layout, 11)
    segment = QueueSegment.create(nbytes, slot_events=3)
    try:
        segment.write_schema(ODD, inferred=False)
        ring = segment.bind_ring(ODD)
        assert ring.spec.slots == 11
        assert ring.spec.slots_offset == HEADER_NBYTES  # no claimed flags in a queue
        assert ring.spec.nbytes <= nbytes - _SCHEMA_NBYTES  # the schema's text follows
        for view in ring.run_views(0, 33, as_stored=True).values():
            view[...] = 255
        assert segment.stored_schema() == ODD  # writing every slot left the schema alone
        assert int(segment.header[0]) != 0  # and the queue's header (its magic)
    finally:
        segment.close()


@pytest.mark.parametrize(("schema", "slot_events"), [(ODD, 3), (TINY, 1), (SCHEMA, 4)])
@pytest.mark.parametrize("budget", [4096, 4099, 10_000, 2**20 + 13])
def test_queue_budget_is_never_exceeded(schema, slot_events, budget):
    layout = SlotLayout(schema=schema, slot_events=slot_events)
    slots = slots_that_fit(budget_nbytes(budget), layout)
    assert layout.region_nbytes(slots) <= budget
    if slots < 16000:  # below the cap, what is left unused is the padding allowance, a slot
        assert budget - slots * layout.slot_nbytes < 2 * 64 * len(schema) + 2 * layout.slot_nbytes


def test_memory_budget_sizes_the_ring(tmp_path):
    layout = SlotLayout(schema=SCHEMA, slot_events=4)
    budget = layout.region_nbytes(10) + 5
    assert layout.region_nbytes(11) > budget
    with shmwriter.Writer(tmp_path / "x.rtdc", SCHEMA, slot_events=4, total_frames=1,
                          memory_budget_nbytes=budget) as writer:
        assert writer.statistics().slots == 10
        writer.producer().put(0, None)
    odd = SlotLayout(schema=ODD, slot_events=3)
    budget = odd.region_nbytes(10) - 1
    assert budget // odd.slot_nbytes >= 10  # counting unpadded slots would overrun the budget
    fits = odd.slots_that_fit(budget)
    assert fits < 10 and odd.region_nbytes(fits) <= budget
    with shmwriter.Writer(tmp_path / "z.rtdc", ODD, slot_events=3, total_frames=1,
                          memory_budget_nbytes=budget) as writer:
        assert writer.statistics().slots == fits
        writer.producer().put(0, None)


def test_a_queue_and_a_ring_share_one_header_layout_and_one_slot_limit():
    queue = shmwriter.EventQueue()
    try:
        header = queue._segment.header
        assert header[Field.MAGIC] == QUEUE_MAGIC and header[Field.OWNER_PID] == os.getpid()
        assert State(int(header[Field.STATE])) is State.STARTING  # no schema yet
        queue.put((0, {"x": np.ones(3)}))
        assert State(int(header[Field.STATE])) is State.RUNNING
        assert header[Field.SLOTS] == queue.slots and header[Field.SLOT_EVENTS] == 4
    finally:
        queue.close()
    layout = SlotLayout(schema=SCHEMA, slot_events=2)
    ring = SlotRing.create(layout, 3, None)
    try:
        assert ring.get(Field.MAGIC) == RING_MAGIC and ring.get(Field.SLOT_EVENTS) == 2
    finally:
        ring.close()
        ring.unlink()
    with pytest.raises(ValueError, match=f"slots must be at most {MAX_SLOTS}; got 16001"):
        RingSpec(name="x", layout=layout, slots=MAX_SLOTS + 1, total_frames=None)


def test_an_unlinked_segment_has_no_name_and_lives_while_mapped():
    name, fd, mapping = create_unlinked_segment(8192)
    try:
        assert not os.path.exists(f"/dev/shm/{name}")
        mapping[:5] = b"hello"
        with mmap.mmap(fd, 8192) as again:  # the descriptor still reaches the memory
            assert again[:5] == b"hello"
    finally:
        mapping.close()
        os.close(fd)
