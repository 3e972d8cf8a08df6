"""Reorder: put frames arriving in any order back into frame order.

Frames at the frontier (the next index the file needs) go straight on; frames
ahead of it wait here, in their ring slots, so that a frame only slightly out
of order is copied once, not twice. When the ring cannot serve the request for
the lowest frame, the writer copies waiting frames out into private memory,
within a byte budget (beyond it only to keep producers from stalling).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._ranges import FrameRanges

__all__ = ["Arrival", "ReorderBuffer"]


@dataclass(slots=True, order=True)
class Arrival:
    """A frame received by the writer, in slots or copied out."""

    frame: int
    nevents: int = field(compare=False)
    slots: list[int] = field(compare=False, default_factory=list)
    """Slots still holding the events (empty once copied out)."""
    rows: list[tuple[int, int]] = field(compare=False, default_factory=list)
    """Where the events lie in the ring while in slots: ``(first row, rows)`` pieces, a row
    being an event's index in the ring's per-feature arrays (see ``SlotRing.row_views``)."""
    arrays: dict[str, np.ndarray[Any, Any]] | None = field(compare=False, default=None)
    """Private copies of the events, or None while they are in slots."""
    nbytes: int = field(compare=False, default=0)
    """Bytes of the private copies."""


class ReorderBuffer:
    """Frames ahead of the frontier, and the frames known to be missing.

    Parameters
    ----------
    total_frames
        Frames of the run, or None when open-ended.
    budget_nbytes
        Most bytes of private copies held at once.
    """

    def __init__(self, total_frames: int | None, budget_nbytes: int) -> None:
        self.total_frames = total_frames
        self.budget_nbytes = budget_nbytes
        #: Bytes of private copies held now, and their peak.
        self.stash_nbytes = self.peak_stash_nbytes = 0
        #: Frames declared missing, as ranges.
        self.missing = FrameRanges()
        self._frontier = 0
        self._newest = -1
        self._waiting: dict[int, Arrival] = {}
        self._in_slots: dict[int, Arrival] = {}  # waiting frames not copied out yet
        self._heap: list[int] = []

    @property
    def frontier(self) -> int:
        """The next frame index the file needs: every frame before it is written or missing."""
        return self._frontier

    @property
    def newest(self) -> int:
        """Highest frame index received, -1 before any."""
        return self._newest

    def __len__(self) -> int:
        return len(self._waiting)

    def is_known(self, frame: int) -> bool:
        """Whether ``frame`` was received, written or declared missing already."""
        return frame < self._frontier or frame in self._waiting

    def has_room(self, nbytes: int) -> bool:
        """Whether a copy of ``nbytes`` fits the budget."""
        return self.stash_nbytes + nbytes <= self.budget_nbytes

    def arrive(self, arrival: Arrival) -> bool:
        """Take a frame received; True if it is at the frontier (which moves past it).

        A frame at the frontier goes straight to the caller, who gathers it and
        then the frames waiting right after it (:meth:`pop_next`). Any other
        frame waits here, in its slots.
        """
        self._newest = max(self._newest, arrival.frame)
        if arrival.frame == self._frontier:
            self._frontier += 1
            return True
        self._waiting[arrival.frame] = arrival
        heapq.heappush(self._heap, arrival.frame)
        if arrival.slots:
            self._in_slots[arrival.frame] = arrival
        self._count_copy(arrival.nbytes)
        return False

    def can_advance(self, first: int, count: int) -> bool:
        """Whether frames ``first .. first + count - 1`` are all new and start at the frontier."""
        return first == self._frontier and (not self._heap or self._heap[0] >= first + count)

    def advance(self, first: int, count: int) -> None:
        """Frames ``first ..`` (``count`` of them, see :meth:`can_advance`) arrived in order
        and go straight to the caller: the frontier moves past them."""
        assert self.can_advance(first, count)
        self._frontier += count
        self._newest = max(self._newest, first + count - 1)

    def held_in_slots(self) -> list[Arrival]:
        """Waiting frames whose events are still in ring slots, the furthest ahead first."""
        return sorted(self._in_slots.values(), reverse=True)

    def store_copy(self, arrival: Arrival, arrays: dict[str, np.ndarray[Any, Any]],
                   nbytes: int) -> list[int]:
        """A waiting frame was copied out of its slots into ``arrays``; return the slots."""
        del self._in_slots[arrival.frame]
        slots, arrival.slots, arrival.rows = arrival.slots, [], []
        arrival.arrays, arrival.nbytes = arrays, nbytes
        self._count_copy(nbytes)
        return slots

    def _count_copy(self, nbytes: int) -> None:
        self.stash_nbytes += nbytes
        self.peak_stash_nbytes = max(self.peak_stash_nbytes, self.stash_nbytes)

    def pop_next(self) -> Arrival | None:
        """The waiting frame at the frontier, if it has arrived; advances the frontier."""
        arrival = self._waiting.pop(self._frontier, None)
        if arrival is None:
            return None
        heapq.heappop(self._heap)
        self._in_slots.pop(arrival.frame, None)
        self.stash_nbytes -= arrival.nbytes
        self._frontier += 1
        return arrival

    def lowest_waiting(self) -> int | None:
        """The smallest frame index waiting, or None."""
        return self._heap[0] if self._heap else None

    def skip_to(self, frame: int) -> range:
        """Declare every frame from the frontier up to ``frame`` missing; return them."""
        skipped = range(self._frontier, max(self._frontier, frame))
        self.missing.add(skipped.start, skipped.stop)
        self._frontier = skipped.stop
        return skipped

    def end(self) -> int:
        """Index one past the last frame the run has, as far as is known now."""
        if self.total_frames is not None:
            return self.total_frames
        return self._newest + 1
