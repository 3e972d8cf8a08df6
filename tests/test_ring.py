"""SlotRing and its segment: creation, attachment, lifetimes, space checks."""

from __future__ import annotations

import os
import pickle
import stat

import numpy as np
import pytest

import shmwriter
from shmwriter._ring import Field, SlotRing
from shmwriter._segment import check_space
from shmwriter._spec import SlotLayout

SCHEMA = shmwriter.Schema({"img": shmwriter.Feature("uint16", (4, 5)),
                           "v": shmwriter.Feature("float64")})


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


def test_memory_budget_sizes_the_ring(tmp_path):
    layout = SlotLayout(schema=SCHEMA, slot_events=4)
    with shmwriter.Writer(tmp_path / "x.rtdc", SCHEMA, slot_events=4, total_frames=1,
                          memory_budget_nbytes=10 * layout.slot_nbytes + 5) as writer:
        assert writer.statistics().slots == 10
        writer.producer().put(0, None)
    with pytest.raises(ValueError, match="cannot hold one slot"):
        shmwriter.Writer(tmp_path / "y.rtdc", SCHEMA, memory_budget_nbytes=100)
