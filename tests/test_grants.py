"""SlotGrants: a producer's slots, with the writer's allocator answering its requests."""

from __future__ import annotations

from collections import deque

import pytest

from shmwriter._channel.grants import SlotGrants
from shmwriter._channel.records import Kind, decode_records
from shmwriter._write.slots import SlotAllocator, SlotRequest
from shmwriter.errors import BrokenError, RingFullError


class Writer:
    """The writer's side in one process: records in, the real allocator's grants out."""

    def __init__(self, allocator: SlotAllocator) -> None:
        self.allocator, self.sent, self.pipe = allocator, bytearray(), deque()

    def step(self) -> None:
        for record in decode_records(self.sent):
            if record.kind in (Kind.REQUEST, Kind.REQUEST_RUN):
                self.allocator.request(SlotRequest(record.value, 0, record.nevents,
                                                   contiguous=record.kind == Kind.REQUEST_RUN))
            elif record.kind == Kind.RELEASE:
                self.allocator.release(0, list(record.slots))
        for grant in self.allocator.grant_pending():
            self.pipe.append(grant.slots)

    def read(self, timeout_s: float) -> list[int]:
        self.step()  # the writer answers while the producer waits
        return self.pipe.popleft() if self.pipe else []


def test_a_grant_that_came_late_is_never_taken_for_a_run():
    allocator = SlotAllocator(16, prefetch=4)
    # another producer's frames wait in the odd slots below 10
    allocator.request(SlotRequest(100, 9, 10))
    (grant,) = allocator.grant_pending()
    allocator.hold(9, [1, 3, 5, 7, 9])
    allocator.release(9, [s for s in grant.slots if s not in (1, 3, 5, 7, 9)])
    writer = Writer(allocator)
    answered = []

    def read_nothing_yet(timeout_s: float) -> list[int]:
        return []

    grants = SlotGrants(writer.sent.extend, read_nothing_yet, lambda: BrokenError("gone"),
                        lambda *args: f"full {args}")
    with pytest.raises(RingFullError):
        grants.take(0, 1, 0.0)  # put_nowait: the grant cannot be there yet
    grants._read = writer.read
    answered.append(grants.take(1, 3, 1.0))  # waits for the request out, then asks again
    run = grants.take_run(2, 2, 1.0)
    assert run == list(range(run[0], run[0] + 2))
    assert not set(run) & {1, 3, 5, 7, 9} and not set(run) & set(answered[0])
