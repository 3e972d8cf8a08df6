"""ReorderBuffer: the frontier, frames waiting in slots or copied out, gaps."""

from __future__ import annotations

from shmwriter._write.reorder import Arrival, ReorderBuffer


def test_frontier_waiting_frames_and_gaps():
    buffer = ReorderBuffer(total_frames=None, budget_nbytes=100)
    assert not buffer.arrive(Arrival(3, 1, [5]))                        # waits in slot 5
    assert not buffer.arrive(Arrival(1, 2, [], arrays={}, nbytes=60))   # copied out already
    assert buffer.newest == 3 and buffer.frontier == 0
    assert buffer.stash_nbytes == 60 and not buffer.has_room(41) and buffer.has_room(40)
    assert [a.frame for a in buffer.held_in_slots()] == [3]
    assert buffer.pop_next() is None                 # frame 0 has not come
    assert buffer.is_known(1) and not buffer.is_known(2)
    assert list(buffer.skip_to(1)) == [0]
    assert buffer.pop_next().frame == 1
    assert buffer.stash_nbytes == 0 and buffer.peak_stash_nbytes == 60
    assert buffer.lowest_waiting() == 3
    arrival = buffer.held_in_slots()[0]
    assert buffer.store_copy(arrival, {}, 30) == [5]
    assert arrival.slots == [] and arrival.arrays == {}
    assert buffer.held_in_slots() == [] and buffer.stash_nbytes == 30
    assert list(buffer.skip_to(3)) == [2]
    assert buffer.pop_next().frame == 3
    assert buffer.missing == [0, 2]
    assert buffer.end() == 4 and len(buffer) == 0


def test_a_frame_at_the_frontier_passes_straight_through():
    buffer = ReorderBuffer(total_frames=10, budget_nbytes=0)
    assert buffer.arrive(Arrival(0, 1, [2]))
    assert buffer.frontier == 1 and len(buffer) == 0 and buffer.stash_nbytes == 0
    assert not buffer.arrive(Arrival(2, 1, [3]))
    assert buffer.arrive(Arrival(1, 1, [4]))
    assert buffer.pop_next().frame == 2 and buffer.frontier == 3
    assert buffer.end() == 10
