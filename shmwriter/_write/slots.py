"""The slot allocator: which ring slot is free, granted to a producer, or held by a frame.

Only the writer loop calls it, from one thread, so it needs no lock. It hands
out the lowest free slots first: the slots in use stay packed at the start of
the ring, so a run of consecutive free slots (what ``Producer.frames`` needs)
is there whenever enough slots are free. Requests are served for the lowest
frame first: the file needs the lowest frames first, so a producer running
far ahead waits instead of filling the ring with frames that cannot be
written yet; and given the frontier, requests for later frames leave room for
the frontier's (see :meth:`SlotAllocator.grant_pending`).
"""

from __future__ import annotations

import heapq
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Grant", "SlotAllocator", "SlotRequest"]

_FREE, _HELD = -1, -2  # slot owner values besides producer ids


@dataclass(slots=True)
class SlotRequest:
    """A producer waiting for slots for one frame (or the first frame of a batch)."""

    frame: int
    """The frame the slots are for: the lowest frame is served first."""
    producer: int
    """The producer's id."""
    wanted: int
    """Slots wanted."""
    contiguous: bool = False
    """Whether the slots must be consecutive (``Producer.frames`` writes them in place)."""
    since: float = field(default_factory=time.monotonic)
    """When the request came (``time.monotonic``)."""


@dataclass(frozen=True, slots=True)
class Grant:
    """Slots granted to a producer: the loop sends them down its grant pipe."""

    producer: int
    slots: list[int]


class SlotAllocator:
    """Who owns each slot of a ring of ``slots`` slots.

    Parameters
    ----------
    slots
        Slots of the ring.
    prefetch
        Extra slots granted ahead to a producer while a quarter of the ring stays free.
    """

    def __init__(self, slots: int, prefetch: int) -> None:
        self.slots, self.prefetch = slots, prefetch
        # per slot: producer id, _FREE or _HELD; and how many frames hold a _HELD one.
        # Plain arrays: a frame touches few slots, and item access beats numpy's fancy
        # indexing there; _find_run looks at all of them through a numpy view.
        self._owner = array("q", [_FREE]) * slots
        self._owner_view = np.frombuffer(self._owner, np.int64)
        self._frames_in = array("i", [0]) * slots
        self._free_heap = list(range(slots))  # may hold stale entries: _owner decides
        self._nfree = slots
        self._granted: dict[int, set[int]] = {}
        self.pending: list[SlotRequest] = []

    @property
    def nfree(self) -> int:
        """Slots free now."""
        return self._nfree

    @property
    def in_use(self) -> int:
        """Slots granted or held by frames."""
        return self.slots - self._nfree

    def granted_to(self, producer: int) -> set[int]:
        """The slots granted to ``producer`` that no frame of it holds yet (a live set)."""
        return self._granted.setdefault(producer, set())

    def owns(self, producer: int, slots: list[int]) -> bool:
        """Whether ``slots`` are distinct and all granted to ``producer``."""
        return len(set(slots)) == len(slots) and self.granted_to(producer).issuperset(slots)

    # -- requests ---------------------------------------------------------------------
    def request(self, request: SlotRequest) -> None:
        """Queue a request; :meth:`grant_pending` serves it when slots are free."""
        self.pending.append(request)

    def urgent(self) -> SlotRequest | None:
        """The request for the lowest frame, or None."""
        return min(self.pending, key=_frame_of) if self.pending else None

    def can_serve(self, request: SlotRequest | None) -> bool:
        """Whether ``request`` (None: nothing is asked) could be granted now."""
        if request is None:
            return True
        if request.contiguous:
            return self._find_run(request.wanted) is not None
        return self._nfree >= request.wanted

    def grant_pending(self, *, frontier: int | None = None) -> list[Grant]:
        """Serve waiting requests, the one for the lowest frame first, while slots last.

        With ``frontier`` (the lowest frame the file still needs), a request for a
        later frame is served only while it leaves a quarter of the ring free, kept
        for the frontier's producer: its frames are the ones that free the others.
        Without that room a producer running ahead takes every free slot, and the
        frontier's next block finds no run long enough: the frames ahead then have
        to be copied out of the ring to make one.
        """
        grants = []
        # spare slots only while a quarter of the ring stays free: enough for a producer
        # to put the frames after a burst of freed slots without asking for each one (a
        # round trip per frame costs both sides more than the copy), and room left for
        # the others
        reserve = self.slots // 4
        while (request := self.urgent()) is not None and self.can_serve(request) \
                and self._leaves_room(request, frontier):
            self.pending.remove(request)
            if request.contiguous:
                start = self._find_run(request.wanted)
                assert start is not None
                slots = list(range(start, start + request.wanted))
            else:
                extra = min(self.prefetch, max(0, self._nfree - request.wanted - reserve))
                slots = self._take_lowest(request.wanted + extra)
            for slot in slots:
                self._owner[slot] = request.producer
            self._nfree -= len(slots)
            self.granted_to(request.producer).update(slots)
            grants.append(Grant(request.producer, slots))
        return grants

    def _leaves_room(self, request: SlotRequest, frontier: int | None) -> bool:
        """Whether serving ``request`` leaves room for the frontier's producer: a quarter
        of the ring, and for a run a second run as long (blocks are alike in size)."""
        if frontier is None or request.frame <= frontier:
            return True
        if self._nfree - request.wanted < self.slots // 4:
            return False
        if not request.contiguous:
            return True
        free = self._owner_view == _FREE
        start = _first_run(free, request.wanted)
        if start is None:
            return False
        free[start:start + request.wanted] = False
        return _first_run(free, request.wanted) is not None

    def can_grant_now(self, request: SlotRequest, *, frontier: int | None = None) -> bool:
        """Whether ``request`` would be granted at once by :meth:`grant_pending` (given the
        same ``frontier``): no request for a lower frame waits, and it can be served.

        Waiting requests for later frames do not stand in its way: they wait because
        the slots are short or are held back, and the lowest frame goes first anyway.
        """
        if any(waiting.frame < request.frame for waiting in self.pending):
            return False
        return self.can_serve(request) and self._leaves_room(request, frontier)

    def withdraw(self, producer: int) -> None:
        """Forget the requests of ``producer`` (it gave up waiting); its slots stay its."""
        self.pending = [r for r in self.pending if r.producer != producer]

    def drop_pending(self) -> None:
        """Forget every waiting request (the run is stopping)."""
        self.pending.clear()

    def everyone_waits(self, producers: set[int]) -> bool:
        """Whether every producer in ``producers`` waits for slots."""
        return producers <= {request.producer for request in self.pending}

    # -- ownership ----------------------------------------------------------------------
    def hold(self, producer: int, slots: list[int]) -> None:
        """A frame of ``producer`` arrived in ``slots`` (distinct): it holds them until freed.

        Frames of a packed batch share slots: a slot is free again once every
        frame holding it was freed.
        """
        if not slots:
            return
        self.granted_to(producer).difference_update(slots)
        owner, frames_in = self._owner, self._frames_in
        for slot in slots:
            owner[slot] = _HELD
            frames_in[slot] += 1

    def free(self, slots: list[int]) -> None:
        """Frames left the ring: each listing of a slot ends one frame's hold on it."""
        frames_in, unheld = self._frames_in, []
        for slot in slots:  # a slot of a packed batch may be listed by several frames
            frames_in[slot] -= 1
            if frames_in[slot] == 0:
                unheld.append(slot)
        self._put_back(unheld)

    def release(self, producer: int, slots: list[int]) -> None:
        """``producer`` gives back granted ``slots`` unused (those not granted are ignored)."""
        granted = self.granted_to(producer)
        mine = [slot for slot in dict.fromkeys(slots) if slot in granted]
        granted.difference_update(mine)
        self._put_back(mine)

    def _put_back(self, slots: list[int]) -> None:
        if not slots:
            return
        owner = self._owner
        for slot in slots:
            owner[slot] = _FREE
        self._nfree += len(slots)
        if len(self._free_heap) + len(slots) > 2 * self.slots:
            # runs granted by _find_run leave stale entries behind: start afresh (a
            # sorted list is a heap)
            self._free_heap = np.flatnonzero(self._owner_view == _FREE).tolist()
        else:
            for slot in slots:
                heapq.heappush(self._free_heap, slot)

    def retire(self, producer: int) -> None:
        """Forget ``producer``: take back its granted slots and drop its requests."""
        self._put_back(list(self._granted.pop(producer, set())))
        self.withdraw(producer)

    # -- finding slots ---------------------------------------------------------------------
    def _take_lowest(self, count: int) -> list[int]:
        slots: list[int] = []
        while len(slots) < count:
            slot = heapq.heappop(self._free_heap)
            if self._owner[slot] == _FREE:  # else stale: taken by a run, or pushed twice
                self._owner[slot] = _HELD
                slots.append(slot)
        return slots

    def _find_run(self, count: int) -> int | None:
        """The first slot of the lowest run of ``count`` free slots, or None."""
        if count > self._nfree:
            return None
        return _first_run(self._owner_view == _FREE, count)


def _first_run(free: np.ndarray[Any, np.dtype[np.bool_]], count: int) -> int | None:
    """The first index of the lowest run of ``count`` true values in ``free``, or None."""
    total = np.concatenate(([0], np.cumsum(free)))
    starts = np.flatnonzero(total[count:] - total[:-count] == count)
    return int(starts[0]) if starts.size else None


def _frame_of(request: SlotRequest) -> int:
    return request.frame
