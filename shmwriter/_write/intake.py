"""Intake: what producers say about their frames, checked, then handed to the rooms.

:class:`FrameIntake` takes the descriptors of frames (one frame, or a packed
batch). It checks each against the slot allocator (its slots must be
granted to its producer) and the reorder buffer (no frame twice, none out of
range). Then the frame's slots become the frame's and the frame goes to the
assembler. A frame that fails the checks is rejected (logged, counted, its
slots back); a record that cannot be honest (a packed batch in slots never
granted) refuses its sender.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .._channel.records import Record
from .._ring.ring import RingSpec
from .._rtdc import MAX_FRAME_INDEX
from .assemble import FrameAssembler
from .channels import ProducerChannel
from .slots import SlotAllocator

__all__ = ["FrameIntake"]

logger = logging.getLogger(__name__)


class FrameIntake:
    """Checks frame descriptors and hands the frames over. Called by the writer loop only.

    Parameters
    ----------
    spec
        The run's ring.
    slots
        Whose slots are whose.
    frames
        Where accepted frames go.
    refuse
        Refuses a producer that sent a record that cannot be honest, saying why.
    """

    def __init__(self, spec: RingSpec, slots: SlotAllocator, frames: FrameAssembler,
                 refuse: Callable[[ProducerChannel, str], None]) -> None:
        self._slots, self._frames, self._refuse = slots, frames, refuse
        # looked up for every frame: kept at hand
        self._slot_events, self._nslots = spec.layout.slot_events, spec.slots
        self._slots_for = spec.layout.slots_for
        self._total_frames = spec.total_frames
        self._frame_limit = MAX_FRAME_INDEX + 1 if spec.total_frames is None else spec.total_frames
        #: Frames rejected so far (out of range, put twice, in slots not granted).
        self.rejected = 0

    def in_range(self, frame: int) -> bool:
        """Whether ``frame`` is a frame index this run can take."""
        return 0 <= frame < self._frame_limit

    def frame(self, channel: ProducerChannel, record: Record) -> None:
        """One frame, its slots listed."""
        frame, nevents, slots = record.value, record.nevents, list(record.slots)
        problem = self._check_frame(channel, frame, nevents, slots)
        if problem:
            self.rejected += 1
            logger.error("producer %d: rejected frame %d: %s", channel.id, frame, problem)
            self._slots.release(channel.id, slots)
            return
        self._slots.hold(channel.id, slots)
        # it waits in its slots (no copy) until the frontier reaches it, unless
        # the ring cannot serve the lowest frame: then the assembler copies frames out
        self._frames.accept(frame, nevents, slots)

    def _from_the_frontier(self, frames: tuple[tuple[int, int], ...]) -> bool:
        """Whether ``frames`` (at least one) are consecutive, new and start at the frontier."""
        if not frames:
            return False
        first, count = frames[0][0], len(frames)
        return (self.in_range(first) and first + count <= self._frame_limit
                and self._frames.reorder.can_advance(first, count)
                and [frame for frame, _ in frames] == list(range(first, first + count)))

    def packed(self, channel: ProducerChannel, record: Record) -> None:
        """A packed batch: its frames' events back to back in consecutive slots, in order."""
        per_slot, total_slots = self._slot_events, self._nslots
        nevents = sum(count for _, count in record.frames)
        first, nslots = record.value, self._slots_for(nevents)
        # bounds by arithmetic first: a forged count must not make a list of a trillion slots
        in_ring = nslots == 0 or (0 <= first and first + nslots <= total_slots)
        run = list(range(first, first + nslots)) if in_ring else []
        if not in_ring or not self._slots.owns(channel.id, run):
            self._refuse(channel, f"sent a packed batch in slots {first}..{first + nslots - 1}"
                                  f" that were not granted to it")
            return
        if self._packed_in_order(channel, record.frames, first * per_slot):
            self._slots.release(channel.id, run)  # the slots no frame holds (none, or padding)
            return
        accepted, row, seen = [], first * per_slot, set()
        for frame, count in record.frames:
            problem = self._check_index(frame) or (
                "duplicate frame index: it is in the batch twice" if frame in seen else None)
            seen.add(frame)
            if problem:
                self.rejected += 1
                logger.error("producer %d: rejected frame %d: %s", channel.id, frame, problem)
            else:
                slots = list(range(row // per_slot, (row + count - 1) // per_slot + 1)) \
                    if count else []
                # every frame holds its slots before any is gathered (and may free them)
                self._slots.hold(channel.id, slots)
                accepted.append((frame, count, slots, [(row, count)] if count else []))
            row += count
        for frame, count, slots, rows in accepted:
            self._frames.accept(frame, count, slots, rows)
        self._slots.release(channel.id, run)  # the slots no accepted frame holds

    def _packed_in_order(self, channel: ProducerChannel, frames: tuple[tuple[int, int], ...],
                         row: int) -> bool:
        """The common packed batch, taken whole: consecutive frames from the frontier on.
        False (nothing done) for any other."""
        if not self._from_the_frontier(frames):
            return False
        per_slot, taken = self._slot_events, []
        for frame, nevents in frames:
            slots = list(range(row // per_slot, (row + nevents - 1) // per_slot + 1)) \
                if nevents else []
            self._slots.hold(channel.id, slots)  # frames may share a slot: each holds it
            taken.append((frame, nevents, slots, [(row, nevents)] if nevents else []))
            row += nevents
        self._frames.accept_in_order(taken)
        return True

    def _check_frame(self, channel: ProducerChannel, frame: int, nevents: int,
                     slots: list[int]) -> str | None:
        if len(slots) != self._slots_for(nevents):
            return f"{nevents} events do not match {len(slots)} slots"
        if slots and not self._slots.owns(channel.id, slots):
            return f"slots {slots} were not granted to this producer"
        return self._check_index(frame)

    def _check_index(self, frame: int) -> str | None:
        if not self.in_range(frame):
            return f"frame index out of range (total_frames={self._total_frames})"
        if self._frames.reorder.is_known(frame):
            return "duplicate frame index: this frame was received already"
        return None
