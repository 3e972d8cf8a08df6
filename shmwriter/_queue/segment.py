"""An EventQueue's segment: the header, the slots and the schema, in one unlinked segment.

Layout (its size is fixed when the queue is created)::

    [header: 4 KiB]                int64 fields (the ring's :class:`~.._ring.ring.Field`)
    [slots region]                 SlotLayout.region_nbytes(slots), once the schema is known
                                   (feature-major: see :class:`.._spec.SlotLayout`)
    ...                            unused when the slots do not fill the budget
    [schema: 64 KiB]               the schema as JSON, once published

The creator makes it with :func:`.._ring.segment.create_unlinked_segment`: its
name is gone at once, so the memory lives exactly as long as some process
holds its descriptor or a mapping. It cannot leak (the kernel frees it when
the last user exits, however it exits) and cannot be removed while a user
still needs it. Other processes receive the descriptor when they attach to the
queue's hub (see :mod:`.hub`).

Who writes what: the schema fields (the text, SLOTS, QUEUE_INFERRED,
QUEUE_PUBLISHER_PID and, last, QUEUE_SCHEMA_NBYTES) are written by the one
process the hub lets publish, before the hub sets STATE to RUNNING; every
other field is the creator's (at creation) or the hub's.
"""

from __future__ import annotations

import json
import mmap
import os

import numpy as np

from .._ring.ring import HEADER_NBYTES, MAX_SLOTS, QUEUE_MAGIC, Field, RingSpec, SlotRing, State
from .._ring.segment import create_unlinked_segment
from .._spec import Feature, Schema, SlotLayout
from .._validate import check_positive_int
from ..errors import BrokenError

__all__ = ["DEFAULT_BUDGET_NBYTES", "QueueSegment", "budget_nbytes", "queue_nbytes",
           "segment_nbytes", "slots_that_fit"]

_SCHEMA_NBYTES = 65536
#: Segment budget when the schema is inferred and no budget is given.
DEFAULT_BUDGET_NBYTES = 64 * 2**20
_DEFAULT_SLOTS = 64


def segment_nbytes(layout: SlotLayout, slots: int) -> int:
    """Bytes of a segment holding ``slots`` slots of ``layout``.

    :func:`slots_that_fit` gives exactly ``slots`` back for it (up to MAX_SLOTS).
    """
    return HEADER_NBYTES + _slots_room(layout, slots) + _SCHEMA_NBYTES


def slots_that_fit(nbytes: int, layout: SlotLayout) -> int:
    """Slots of ``layout`` a segment of ``nbytes`` holds (at most MAX_SLOTS, 0 if none).

    Never more than fit: ``layout.region_nbytes`` of the answer is at most the
    room between the header and the schema.
    """
    room = _whole_int64s(nbytes - HEADER_NBYTES - _SCHEMA_NBYTES)
    fits = (room - _padding_room(layout)) // _slot_cost(layout)
    return max(0, min(MAX_SLOTS, fits))


def budget_nbytes(memory_budget_nbytes: int) -> int:
    """Segment size for a budget of the slots region, plus the fixed parts (no rounding up)."""
    return HEADER_NBYTES + _whole_int64s(memory_budget_nbytes) + _SCHEMA_NBYTES


# The segment's size is all that tells a publisher how many slots the creator meant, but
# a feature-major region can hold several slot counts in the same bytes (the padding of
# its blocks absorbs them). So the queue books each slot at its unpadded size (at least
# 8 bytes, so that every count gives a different whole number of int64s) plus, once, the
# most padding any region has: every count then has its own size, and that size holds
# its region. A budget may so leave up to ~64 bytes per feature unused.

def _slots_room(layout: SlotLayout, slots: int) -> int:
    """Bytes the segment sets aside for ``slots`` slots: a whole number of int64s."""
    return -(-slots * _slot_cost(layout) // 8) * 8 + _padding_room(layout)


def _slot_cost(layout: SlotLayout) -> int:
    return max(8, layout.slot_nbytes)


def _padding_room(layout: SlotLayout) -> int:
    return -(-layout.max_padding_nbytes // 8) * 8


def _whole_int64s(nbytes: int) -> int:
    """``nbytes`` rounded down to whole int64s (the schema area after the slots stays aligned)."""
    return nbytes // 8 * 8


def queue_nbytes(schema: Schema | None, slots: int | None, slot_events: int,
                 memory_budget_nbytes: int | None) -> int:
    """The segment size for an EventQueue's arguments (checked here).

    Raises
    ------
    ValueError, TypeError
        If they do not make a queue; the message names the argument.
    """
    if memory_budget_nbytes is not None:
        check_positive_int("memory_budget_nbytes", memory_budget_nbytes)
    if schema is None:
        if slots is not None:
            raise ValueError(f"slots={slots!r} needs a schema (the slot size depends on it); "
                             f"pass memory_budget_nbytes instead")
        return budget_nbytes(memory_budget_nbytes or DEFAULT_BUDGET_NBYTES)
    if not isinstance(schema, Schema):
        raise TypeError(f"schema must be a shmwriter.Schema or None; got {schema!r}")
    layout = SlotLayout(schema=schema, slot_events=slot_events)
    if memory_budget_nbytes is not None:
        count = slots_that_fit(budget_nbytes(memory_budget_nbytes), layout)
        if count < 1:
            one = segment_nbytes(layout, 1) - budget_nbytes(0)
            raise ValueError(f"memory_budget_nbytes={memory_budget_nbytes} cannot hold one slot "
                             f"of {one} bytes; raise it or lower slot_events")
    else:
        count = check_positive_int("slots", _DEFAULT_SLOTS if slots is None else slots)
    if count > MAX_SLOTS:
        raise ValueError(f"slots must be at most {MAX_SLOTS}; got {count}")
    return segment_nbytes(layout, count)


class QueueSegment:
    """This process's mapping of one queue's segment.

    Use :meth:`create` (the queue's creator) or :meth:`attach` (a process
    that received the descriptor). :meth:`close` releases this process's
    descriptor and mapping and is idempotent; nothing needs unlinking.
    """

    _mmap: mmap.mmap | None = None
    ring: SlotRing | None = None

    def __init__(self, name: str, fd: int, nbytes: int, mapping: mmap.mmap) -> None:
        #: The segment's name (unlinked: for messages only).
        self.name = name
        #: Its descriptor in this process (passed to the processes that attach).
        self.fd = fd
        #: Its size in bytes.
        self.nbytes = nbytes
        self._mmap = mapping
        base = np.frombuffer(mapping, dtype=np.uint8)
        #: The header's int64 fields.
        self.header = base[:HEADER_NBYTES].view(np.int64)
        self._schema_text = base[nbytes - _SCHEMA_NBYTES:]

    @classmethod
    def create(cls, nbytes: int, slot_events: int) -> QueueSegment:
        """Make the segment (unlinked at once) with a header that says STARTING.

        Raises
        ------
        ShmSpaceError
            If /dev/shm or memory cannot hold it.
        """
        name, fd, mapping = create_unlinked_segment(nbytes)
        segment = cls(name, fd, nbytes, mapping)
        segment.header[Field.MAGIC] = QUEUE_MAGIC
        segment.header[Field.OWNER_PID] = os.getpid()
        segment.header[Field.SLOT_EVENTS] = slot_events
        segment.header[Field.STATE] = State.STARTING
        return segment

    @classmethod
    def attach(cls, name: str, fd: int, nbytes: int) -> QueueSegment:
        """Map the segment behind ``fd``, which this process owns from now on.

        Raises
        ------
        BrokenError
            If it is not an EventQueue's segment.
        """
        try:
            mapping = mmap.mmap(fd, nbytes)
        except BaseException:
            os.close(fd)
            raise
        segment = cls(name, fd, nbytes, mapping)
        if segment.header[Field.MAGIC] != QUEUE_MAGIC:
            segment.close()
            raise BrokenError(f"segment {name!r} is not an EventQueue segment")
        return segment

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called in this process."""
        return self._mmap is None

    @property
    def ready(self) -> bool:
        """Whether the schema is published and the hub hands out slots."""
        return int(self.header[Field.STATE]) == State.RUNNING

    @property
    def slots(self) -> int:
        """Slots of the queue (0 until the schema is published)."""
        return int(self.header[Field.SLOTS])

    @property
    def slot_events(self) -> int:
        """Events one slot holds."""
        return int(self.header[Field.SLOT_EVENTS])

    def stored_schema(self) -> Schema | None:
        """The schema text in the segment, once complete (even if not yet RUNNING)."""
        nbytes = int(self.header[Field.QUEUE_SCHEMA_NBYTES])
        if nbytes == 0:
            return None
        text = self._schema_text[:nbytes].tobytes().decode("utf-8")
        return Schema({name: Feature(spec["dtype"], tuple(spec["shape"]))
                       for name, spec in json.loads(text).items()})

    def write_schema(self, schema: Schema, *, inferred: bool) -> None:
        """Store ``schema`` and the slots it gets; only the one allowed to publish calls it.

        Raises
        ------
        ValueError
            If not one slot of the schema fits the segment, or its text is too long.
        """
        layout = SlotLayout(schema=schema, slot_events=self.slot_events)
        slots = slots_that_fit(self.nbytes, layout)
        if slots < 1:
            room = self.nbytes - HEADER_NBYTES - _SCHEMA_NBYTES
            raise ValueError(
                f"memory_budget_nbytes={room} cannot hold one slot of "
                f"{_slots_room(layout, 1)} bytes for the schema {schema!r}; raise "
                f"memory_budget_nbytes or lower slot_events")
        text = json.dumps(schema.to_dict()).encode("utf-8")
        if len(text) > _SCHEMA_NBYTES:
            raise ValueError(f"the schema's description takes {len(text)} bytes; at most "
                             f"{_SCHEMA_NBYTES} fit")
        self.header[Field.QUEUE_SCHEMA_NBYTES] = 0  # an earlier publisher may have died halfway
        self._schema_text[:len(text)] = np.frombuffer(text, np.uint8)
        self.header[Field.SLOTS] = slots
        self.header[Field.QUEUE_INFERRED] = int(inferred)
        self.header[Field.QUEUE_PUBLISHER_PID] = os.getpid()
        self.header[Field.QUEUE_SCHEMA_NBYTES] = len(text)  # complete from here on

    def bind_ring(self, schema: Schema) -> SlotRing:
        """The slots as a :class:`SlotRing` view (once RUNNING)."""
        if self.ring is None:
            assert self._mmap is not None
            layout = SlotLayout(schema=schema, slot_events=self.slot_events)
            spec = RingSpec(name=self.name, layout=layout, slots=self.slots, total_frames=None)
            self.ring = SlotRing(spec, self._mmap, owner=False)
        return self.ring

    def close(self) -> None:
        """Release this process's descriptor and mapping (views handed out keep it mapped)."""
        if self._mmap is None:
            return
        mapping, self._mmap = self._mmap, None
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.header = self._schema_text = None  # type: ignore[assignment]
        if self.ring is not None:
            ring, self.ring = self.ring, None
            ring.close()  # closes the mapping too
            return
        try:
            mapping.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes when it is freed
