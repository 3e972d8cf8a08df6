"""ReorderBuffer: the frontier, frames waiting in slots or copied out, gaps."""

from __future__ import annotations

from shmwriter._reorder import Arrival, ReorderBuffer


def test_frontier_waiting_frames_and_gaps():
    buffer = ReorderBuffer(total_frames=None, budget_nbytes=100)
    buffer.hold(Arrival(3, 1, [5]))                   # waits in slot 5
    buffer.hold(Arrival(1, 2, [], arrays={}, nbytes=60))  # copied out already
    assert buffer.stash_nbytes == 60 and not buffer.has_room(41) and buffer.has_room(40)
    assert [a.frame for a in buffer.held_in_slots()] == [3]
    assert buffer.pop_next() is None                 # frame 0 has not come
    assert buffer.is_known(1) and not buffer.is_known(2)
    assert list(buffer.skip_to(1)) == [0]
    assert buffer.pop_next().frame == 1
    assert buffer.stash_nbytes == 0 and buffer.peak_stash_nbytes == 60
    assert buffer.lowest_waiting() == 3
    arrival = buffer.held_in_slots()[0]
    arrival.nbytes = 30
    buffer.mark_copied(arrival)
    assert buffer.held_in_slots() == [] and buffer.stash_nbytes == 30
    buffer.newest = 3
    assert list(buffer.skip_to(3)) == [2]
    assert buffer.pop_next().frame == 3
    assert buffer.missing == [0, 2]
    assert buffer.end() == 4 and len(buffer) == 0
