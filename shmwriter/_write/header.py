"""The writer's side of the ring header: the run's state and figures, written in one place.

Producers read the state (and the error text) to learn how a run ends;
``statistics()`` and ``shmwriter top`` read the figures. :class:`RunHeader`
is the only writer of them, so the order that matters is kept here: the
state and the error text go in before any producer's channel closes.
"""

from __future__ import annotations

import os
import time

from .._ring.ring import Field, SlotRing, State
from .gather import Chunk
from .reorder import ReorderBuffer

__all__ = ["RunHeader"]


class RunHeader:
    """Writes the header of ``ring`` for the writer loop (and its sink thread)."""

    def __init__(self, ring: SlotRing) -> None:
        self._ring = ring

    def started(self) -> None:
        """The writer runs in this process from now on."""
        self._ring.set(Field.WRITER_PID, os.getpid())
        self._ring.set(Field.START_TIME_NS, time.time_ns())

    def set_state(self, state: State, error: str | None = None) -> None:
        """Store the run's state, and first the error text (if any) that explains it."""
        if error:
            self._ring.set_error_text(error)
        self._ring.set(Field.STATE, state)

    def announce_end(self, state: State, error: str | None) -> None:
        """Say how the run ends, before any producer's channel closes."""
        if state is State.FAILED:
            self.set_state(State.FAILED, error or "the writer failed")
        elif state is State.DONE:
            self.set_state(State.CLOSING)

    def note_error(self, text: str) -> None:
        """Store an error text without changing the state (a producer refused, say)."""
        self._ring.set_error_text(text)

    def count_received(self, nbytes: int) -> None:
        """Descriptor bytes received."""
        self._ring.header[Field.DESCRIPTOR_NBYTES] += nbytes

    def count_producer(self) -> None:
        """A producer said hello."""
        self._ring.header[Field.PRODUCERS_SEEN] += 1

    def count_written(self, chunk: Chunk) -> None:
        """A chunk is in the file (called by the sink thread)."""
        header = self._ring.header
        header[Field.WRITTEN_EVENTS] += chunk.nevents
        header[Field.WRITTEN_FRAMES] += chunk.nframes - chunk.nmissing
        header[Field.WRITTEN_NBYTES] += chunk.nbytes

    def set_write_queue_size(self, size: int) -> None:
        """Chunks waiting for the disk."""
        self._ring.set(Field.WRITE_QUEUE_SIZE, size)

    @property
    def written_frames(self) -> int:
        """Frames whose events are in the file."""
        return self._ring.get(Field.WRITTEN_FRAMES)

    def publish(self, *, slots_in_use: int, reorder: ReorderBuffer, rejected: int,
                producers_alive: int) -> None:
        """Refresh the figures ``statistics()`` and ``shmwriter top`` read."""
        if self._ring.closed:
            return
        header = self._ring.header
        header[Field.SLOTS_IN_USE] = slots_in_use
        header[Field.PEAK_SLOTS_IN_USE] = max(slots_in_use,
                                              int(header[Field.PEAK_SLOTS_IN_USE]))
        header[Field.FRAMES_DONE] = reorder.frontier
        header[Field.NEWEST_FRAME] = reorder.newest
        header[Field.MISSING_FRAMES] = len(reorder.missing)
        header[Field.STASH_NBYTES] = reorder.stash_nbytes
        header[Field.PEAK_STASH_NBYTES] = reorder.peak_stash_nbytes
        header[Field.REJECTED_FRAMES] = rejected
        header[Field.PRODUCERS_ALIVE] = producers_alive
        header[Field.UPDATE_TIME_NS] = time.time_ns()
