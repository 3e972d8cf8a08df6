"""SlotAllocator: lowest frame first, lowest slots first, runs of consecutive slots."""

from __future__ import annotations

from shmwriter._write.slots import SlotAllocator, SlotRequest


def grants(allocator):
    return [(g.producer, g.slots) for g in allocator.grant_pending()]


def test_the_request_for_the_lowest_frame_is_served_first_with_the_lowest_slots():
    allocator = SlotAllocator(8, prefetch=0)
    allocator.request(SlotRequest(frame=5, producer=1, wanted=2))
    allocator.request(SlotRequest(frame=3, producer=2, wanted=3))
    assert grants(allocator) == [(2, [0, 1, 2]), (1, [3, 4])]
    assert allocator.nfree == 3 and allocator.in_use == 5
    allocator.request(SlotRequest(frame=9, producer=1, wanted=4))
    assert grants(allocator) == []                  # 3 free: it waits, whole
    allocator.hold(2, [0, 1, 2])                    # frame 3 arrived in them
    assert allocator.granted_to(2) == set()
    allocator.free([1])
    assert grants(allocator) == [(1, [1, 5, 6, 7])]


def test_a_producer_far_ahead_waits_behind_the_lowest_frame():
    allocator = SlotAllocator(4, prefetch=0)
    allocator.request(SlotRequest(frame=1, producer=1, wanted=4))
    allocator.request(SlotRequest(frame=100, producer=2, wanted=1))
    allocator.free([])  # nothing happens
    assert grants(allocator) == [(1, [0, 1, 2, 3])]
    assert grants(allocator) == []
    assert allocator.urgent().frame == 100


def test_prefetch_only_while_a_quarter_of_the_ring_stays_free():
    allocator = SlotAllocator(16, prefetch=3)
    allocator.request(SlotRequest(frame=0, producer=1, wanted=1))
    assert grants(allocator) == [(1, [0, 1, 2, 3])]
    allocator.request(SlotRequest(frame=1, producer=1, wanted=6))
    assert grants(allocator) == [(1, [4, 5, 6, 7, 8, 9, 10, 11])]  # 12 free - 6 - 4: 2 extra
    allocator.request(SlotRequest(frame=2, producer=1, wanted=1))
    assert grants(allocator) == [(1, [12])]  # a quarter of the ring is all that is free
    allocator.hold(1, list(range(13)))  # frames arrived in every slot granted
    allocator.free(list(range(8)))  # a burst of freed slots: a chunk was gathered
    allocator.request(SlotRequest(frame=3, producer=2, wanted=1))
    assert grants(allocator) == [(2, [0, 1, 2, 3])]  # the next frames need not ask


def test_a_run_of_consecutive_slots_waits_until_one_is_free():
    allocator = SlotAllocator(8, prefetch=0)
    allocator.request(SlotRequest(frame=0, producer=1, wanted=8))
    grants(allocator)
    allocator.hold(1, list(range(8)))
    allocator.free([0, 2, 3, 5])
    run = SlotRequest(frame=1, producer=2, wanted=3, contiguous=True)
    allocator.request(run)
    assert not allocator.can_serve(run) and grants(allocator) == []
    allocator.free([4])
    assert allocator.can_serve(run)
    assert grants(allocator) == [(2, [2, 3, 4])]
    allocator.request(SlotRequest(frame=2, producer=1, wanted=2))
    assert grants(allocator) == [(1, [0, 5])]           # stale heap entries are skipped


def test_retiring_a_producer_takes_back_its_slots_and_requests():
    allocator = SlotAllocator(4, prefetch=0)
    allocator.request(SlotRequest(frame=0, producer=1, wanted=3))
    grants(allocator)
    allocator.request(SlotRequest(frame=1, producer=1, wanted=4))
    assert allocator.owns(1, [0, 2])
    assert not allocator.owns(1, [0, 0]) and not allocator.owns(2, [0])
    allocator.retire(1)
    assert allocator.nfree == 4 and allocator.pending == []
    assert allocator.everyone_waits(set())


def test_many_runs_keep_the_free_list_bounded():
    allocator = SlotAllocator(4, prefetch=0)
    for frame in range(100):
        allocator.request(SlotRequest(frame=frame, producer=1, wanted=2, contiguous=True))
        (granted,) = grants(allocator)
        allocator.hold(1, granted[1])
        allocator.free(granted[1])
    assert len(allocator._free_heap) <= 2 * 4
    allocator.request(SlotRequest(frame=100, producer=1, wanted=4))
    assert grants(allocator) == [(1, [0, 1, 2, 3])]


def test_requests_after_the_frontier_leave_a_quarter_of_the_ring_for_it():
    allocator = SlotAllocator(16, prefetch=0)
    allocator.request(SlotRequest(frame=200, producer=2, wanted=13))
    assert grants_at(allocator, 100) == []                  # it would leave 3 of 16 free
    allocator.request(SlotRequest(frame=100, producer=1, wanted=13))
    assert grants_at(allocator, 100) == [list(range(13))]   # the frontier's own: served
    allocator.release(1, list(range(13)))                  # given back unused
    assert grants_at(allocator, 100) == []                  # 3 of 16 would be left again
    assert grants_at(allocator, None) == [list(range(13))]  # no frontier: served


def test_a_run_after_the_frontier_leaves_a_second_run_as_long():
    allocator = SlotAllocator(16, prefetch=0)
    allocator.request(SlotRequest(frame=1, producer=1, wanted=9))
    assert grants(allocator) == [(1, list(range(9)))]
    allocator.hold(1, list(range(9)))
    allocator.free(list(range(8)))                             # free: 0-7 and 9-15
    allocator.request(SlotRequest(frame=300, producer=2, wanted=5, contiguous=True))
    assert grants_at(allocator, 10) == [[0, 1, 2, 3, 4]]        # 9-15 stays for a run of 5
    allocator.request(SlotRequest(frame=301, producer=2, wanted=5, contiguous=True))
    assert grants_at(allocator, 10) == []          # 5 would stay free, but in no run of 5
    allocator.request(SlotRequest(frame=10, producer=1, wanted=3, contiguous=True))
    assert grants_at(allocator, 10) == [[5, 6, 7]]  # the frontier's own: served
    assert grants_at(allocator, None) == [[9, 10, 11, 12, 13]]  # no frontier: served


def grants_at(allocator, frontier):
    return [g.slots for g in allocator.grant_pending(frontier=frontier)]


def test_a_request_now_passes_requests_for_later_frames_but_keeps_the_frontier_s_room():
    allocator = SlotAllocator(16, prefetch=0)
    allocator.request(SlotRequest(frame=300, producer=2, wanted=14))
    assert grants_at(allocator, 100) == []                       # held back: 2 of 16 left
    assert allocator.can_grant_now(SlotRequest(frame=100, producer=1, wanted=2), frontier=100)
    assert not allocator.can_grant_now(SlotRequest(frame=400, producer=3, wanted=1))  # after 300
    assert not allocator.can_grant_now(SlotRequest(frame=200, producer=1, wanted=13),
                                       frontier=100)             # 3 of 16 left
    assert allocator.can_grant_now(SlotRequest(frame=200, producer=1, wanted=13))
