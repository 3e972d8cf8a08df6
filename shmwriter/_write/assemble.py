"""Assembly: frames received, in any order, into chunks in frame order, and out of the ring.

:class:`FrameAssembler` owns the :class:`~._reorder.ReorderBuffer` and the
:class:`~._gather.ChunkGatherer`, and decides when a frame's slots go back to
the :class:`~._slots.SlotAllocator`: frames at the frontier are gathered in
batches (one numpy call per feature for many frames) right after each read
from a producer; frames ahead of the frontier wait in their slots, and are
copied out of the ring only when it cannot serve the request for the lowest
frame (see :meth:`FrameAssembler.relieve`). Full chunks go to ``emit``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import numpy as np

from .._ring.ring import SlotRing
from .columns import ColumnLayout
from .gather import Chunk, ChunkGatherer
from .reorder import Arrival, ReorderBuffer
from .slots import SlotAllocator, SlotRequest

__all__ = ["FrameAssembler"]

logger = logging.getLogger(__name__)

#: Events per frame the first chunk's columns have room for: room is mapped, not touched,
#: so a guess on the high side costs address space only (RT-DC frames hold 0 to a few).
_FIRST_EVENTS_PER_FRAME = 2


class FrameAssembler:
    """Frames in, chunks out, slots freed. Called by the writer loop only.

    Parameters
    ----------
    ring
        The run's ring, mapped in this process.
    allocator
        Gets back the slots of frames that left the ring.
    write_threshold
        Frames per chunk.
    derived
        Per-event features the writer adds.
    layouts
        Each feature's column layout, the sink's (``H5Sink.layouts``).
    reorder_budget_nbytes
        Most bytes of frames copied out of the ring to wait for earlier ones.
    emit
        Takes each full chunk (it may wait while the disk is behind).
    """

    def __init__(self, ring: SlotRing, allocator: SlotAllocator, *, write_threshold: int,
                 derived: tuple[str, ...], layouts: Mapping[str, ColumnLayout],
                 reorder_budget_nbytes: int, emit: Callable[[Chunk], None]) -> None:
        spec = ring.spec
        self._layout, self._allocator, self._emit = spec.layout, allocator, emit
        self._write_threshold = write_threshold
        self.reorder = ReorderBuffer(spec.total_frames, reorder_budget_nbytes)
        self.gatherer = ChunkGatherer(spec.layout.schema, derived, layouts,
                                      first_room_events=_FIRST_EVENTS_PER_FRAME * write_threshold)
        self._rows = ring.row_views()
        # frontier frames not copied yet: (frame, nevents, rows), and their slots
        self._in_order: list[tuple[int, int, list[tuple[int, int]]]] = []
        self._in_order_slots: list[int] = []
        self._noted_budget = False
        #: CPU nanoseconds spent copying events into chunks and out of the ring.
        self.gather_cpu_ns = 0

    def release_views(self) -> None:
        """Drop every view of the ring (before it is unmapped)."""
        self._rows = {}

    # -- frames in -------------------------------------------------------------------
    def accept(self, frame: int, nevents: int, slots: list[int],
               rows: list[tuple[int, int]] | None = None) -> None:
        """Take a checked frame held in ``slots``; its events fill them from the start, or lie
        at ``rows`` (``(first row, rows)`` pieces, for frames of a packed batch)."""
        arrival = Arrival(frame, nevents, slots,
                          self.rows_of(slots, nevents) if rows is None else rows)
        if self.reorder.arrive(arrival):
            self._gather(arrival)
            self.drain()

    def rows_of(self, slots: list[int], nevents: int) -> list[tuple[int, int]]:
        """Where ``nevents`` events that fill ``slots`` from the start of each lie in the
        ring, as ``(first row, rows)`` pieces."""
        per_slot = self._layout.slot_events
        return [(slot * per_slot, min(per_slot, nevents - j * per_slot))
                for j, slot in enumerate(slots)]

    def accept_in_order(self, frames: list[tuple[int, int, list[int], list[tuple[int, int]]]],
                        ) -> None:
        """Take checked frames ``(frame, nevents, slots, rows)`` that follow each other from
        the frontier on (``reorder.can_advance`` said so), held in their slots: gathered
        without a stop in the reorder buffer."""
        self.reorder.advance(frames[0][0], len(frames))
        in_order, threshold = self._in_order, self._write_threshold
        for frame, nevents, slots, rows in frames:
            in_order.append((frame, nevents, rows))
            self._in_order_slots += slots
            if self.gatherer.nframes + len(in_order) >= threshold:
                self.flush()
                in_order = self._in_order  # flush started a new list
        self.drain()

    def drain(self) -> None:
        """Gather the frames waiting right after the frontier."""
        while (arrival := self.reorder.pop_next()) is not None:
            self._gather(arrival)

    def skip_missing(self, frame: int) -> None:
        """Declare the frames from the frontier up to ``frame`` missing (one range)."""
        skipped = self.reorder.skip_to(frame)
        if skipped:
            self.settle()  # the frames before the gap come first
            self.gatherer.skip(len(skipped))  # a gap adds no events: one chunk covers it
            if self.gatherer.nframes >= self._write_threshold:
                self.flush()

    def settle(self) -> None:
        """Copy the batch of in-order frames out of their slots into the chunk; free them.

        Runs after every read from a producer, so a slot waits at most for the
        records of one read to be handled.
        """
        if self._in_order:
            batch, self._in_order = self._in_order, []
            slots, self._in_order_slots = self._in_order_slots, []
            started = time.thread_time_ns()
            self.gatherer.append_from_ring(batch, self._rows)
            self.gather_cpu_ns += time.thread_time_ns() - started
            self._allocator.free(slots)

    def flush(self) -> None:
        """Emit what is gathered, even if less than a chunk."""
        self.settle()
        if self.gatherer.nframes:
            self._emit(self.gatherer.take())

    def _gather(self, arrival: Arrival) -> None:
        if arrival.arrays is None:
            self._in_order.append((arrival.frame, arrival.nevents, arrival.rows))
            self._in_order_slots += arrival.slots
        else:
            self.settle()
            started = time.thread_time_ns()
            self.gatherer.append(arrival.frame, arrival.nevents, arrival.arrays)
            self.gather_cpu_ns += time.thread_time_ns() - started
        if self.gatherer.nframes + len(self._in_order) >= self._write_threshold:
            self.flush()

    # -- relieving the ring ----------------------------------------------------------
    def relieve(self, urgent: SlotRequest | None, *, desperate: bool) -> None:
        """Copy waiting frames out of the ring when it cannot serve the lowest frame's request.

        While the request for the lowest frame (``urgent``; None when nothing is
        asked) can be served, nothing is copied: frames ahead of the frontier
        wait in their slots, and a producer running further ahead waits for
        slots. Copying them out early would make the writer copy every frame
        put ahead twice, and the writer's copying is what producers wait for.
        Otherwise the frames furthest ahead are copied out until it can be
        served: within the reorder budget any frame; beyond it only frames
        after that one, or any frame when the loop is ``desperate`` (a producer
        died, every producer waits, or the request waited too long). That keeps
        the ring moving at the price of memory (noted in the log).
        """
        allocator = self._allocator
        if allocator.can_serve(urgent):
            return
        assert urgent is not None
        for arrival in self.reorder.held_in_slots():  # the furthest ahead first
            stuck = desperate or urgent.frame < arrival.frame
            if not self.reorder.has_room(self.nbytes(arrival.nevents)):
                if not stuck:
                    break
                self._note_budget_exceeded()
            self._copy_out(arrival)
            if allocator.can_serve(urgent):
                return

    def _copy_out(self, arrival: Arrival) -> None:
        """Copy a waiting frame's events out of its slots into private memory; free the slots."""
        started = time.thread_time_ns()
        arrays = {}
        for name, feature in self._layout.schema.items():
            arrays[name] = np.empty((arrival.nevents, *feature.shape), feature.file_dtype)
            at, source = 0, self._rows[name]
            for first, count in arrival.rows:
                arrays[name][at:at + count] = source[first:first + count]
                at += count
        self._allocator.free(self.reorder.store_copy(arrival, arrays,
                                                     self.nbytes(arrival.nevents)))
        self.gather_cpu_ns += time.thread_time_ns() - started

    def nbytes(self, nevents: int) -> int:
        """Bytes of ``nevents`` events over all features."""
        return nevents * self._layout.schema.event_nbytes

    def _note_budget_exceeded(self) -> None:
        # not a fault: producers a few frames apart, or one that starts late, get
        # here; memory stays bounded by what the producers can put ahead, and
        # statistics() and `shmwriter top` show the stash's peak
        if not self._noted_budget:
            logger.info("frames arrive far out of order: the reorder stash exceeds its budget of "
                        "%d bytes to keep the ring moving", self.reorder.budget_nbytes)
            self._noted_budget = True
