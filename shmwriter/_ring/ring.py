"""The slot ring: one shared-memory segment of equal slots plus a header.

Layout of the segment::

    [header: 4 KiB]  int64 counters of the run, its state, error text, path
    [claimed: one byte per frame, page aligned]   only with total_frames
    [feature 0: slots * slot_events events][feature 1: ...] ...
                     the slots region, SlotLayout.region_nbytes(slots) bytes

The slots region is feature-major (see :class:`~._spec.SlotLayout`): each
feature's block starts on 64 bytes and holds the events of slot 0, then slot
1, ... back to back, so the events of consecutive slots are one contiguous
array per feature (:meth:`SlotRing.run_views`).

The header is written by the writer only and read by anyone (producers for
the writer's state, ``shmwriter top`` for figures), so it needs no lock.
``claimed`` is set by producers to catch a frame index put twice.

The creator (the :class:`~shmwriter.Writer`) calls :meth:`SlotRing.unlink`
once, after the run; every process calls :meth:`SlotRing.close` for itself.
"""

from __future__ import annotations

import enum
import mmap
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._spec import SlotLayout
from .._validate import check_positive_int
from .segment import attach_segment, create_segment, new_run_name, unlink_segment

__all__ = ["HEADER_NBYTES", "MAX_SLOTS", "QUEUE_MAGIC", "RING_MAGIC", "Field", "RingSpec",
           "SlotRing", "State"]

#: Bytes of the header at the start of every segment (a Writer's ring and an EventQueue's).
HEADER_NBYTES = 4096
#: Most slots a ring may have (a grant of all of them must fit the 64 KiB of a grant pipe).
MAX_SLOTS = 16000
#: ``Field.MAGIC`` of a Writer's ring ("shmwrit1") and of an EventQueue's segment ("shmwque1").
RING_MAGIC, QUEUE_MAGIC = 0x73686D7772697431, 0x73686D7771756531
_ERROR_OFFSET, _ERROR_NBYTES = 1024, 1024
_PATH_OFFSET, _PATH_NBYTES = 2048, 2048


def error_text(header: bytes) -> str:
    """The writer's error message stored in a copied ``header``."""
    return _text_at(header, _ERROR_OFFSET, _ERROR_NBYTES)


def path_text(header: bytes) -> str:
    """The file path stored in a copied ``header``."""
    return _text_at(header, _PATH_OFFSET, _PATH_NBYTES)


def _text_at(header: bytes, offset: int, nbytes: int) -> str:
    return header[offset:offset + nbytes].split(b"\0", 1)[0].decode("utf-8", "replace")


class Field(enum.IntEnum):
    """Index of each int64 field in the header of a Writer's ring or of an EventQueue.

    Both use MAGIC, OWNER_PID (the creator), STATE, SLOTS and SLOT_EVENTS; the
    counters after them are a Writer's, the fields from QUEUE_SCHEMA_NBYTES on
    an EventQueue's.
    """

    MAGIC = 0
    OWNER_PID = 1
    WRITER_PID = 2
    STATE = 3
    SLOTS = 4
    TOTAL_FRAMES = 5          # -1 for an open-ended run
    WRITTEN_EVENTS = 6
    WRITTEN_FRAMES = 7
    FRAMES_DONE = 8           # frames before this index are written or missing
    WRITE_QUEUE_SIZE = 9
    SLOTS_IN_USE = 10
    PEAK_SLOTS_IN_USE = 11
    NEWEST_FRAME = 12         # highest frame index received, -1 before any
    MISSING_FRAMES = 13
    WRITTEN_NBYTES = 14
    PRODUCERS_ALIVE = 15
    START_TIME_NS = 16
    UPDATE_TIME_NS = 17
    STASH_NBYTES = 18
    PEAK_STASH_NBYTES = 19
    DESCRIPTOR_NBYTES = 20
    REJECTED_FRAMES = 21
    PRODUCERS_SEEN = 22
    SLOT_EVENTS = 23
    QUEUE_SCHEMA_NBYTES = 24  # nonzero once the schema text is complete
    QUEUE_PUBLISHER_PID = 25
    QUEUE_INFERRED = 26       # 1 if the schema was inferred from events
    QUEUE_CONSUMER_PID = 27   # the latest process that took frames; 0: none yet


class State(enum.IntEnum):
    """Life stage of a run, as stored in the header."""

    STARTING = 0
    """A Writer's ring before its writer runs; an EventQueue before its schema is known."""
    RUNNING = 1
    DONE = 2
    FAILED = 3
    ABORTED = 4
    CLOSING = 5
    """Every frame is in; the file is being closed (producers get ClosedError)."""
    ABORTING = 6
    """Aborted: the writer takes what was sent until now; a frame sent later may be lost,
    so a producer that sees this state after sending raises BrokenError."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RingSpec:
    """Everything a process needs to attach to a ring: it pickles as a few ints."""

    name: str
    """Segment name (without the leading slash)."""
    layout: SlotLayout
    """Byte layout of the slots."""
    slots: int
    """Number of slots."""
    total_frames: int | None
    """Frames of the run, or None when open-ended."""

    def __post_init__(self) -> None:
        check_positive_int("slots", self.slots)
        if self.slots > MAX_SLOTS:
            raise ValueError(f"slots must be at most {MAX_SLOTS}; got {self.slots}")
        if self.total_frames is not None:
            check_positive_int("total_frames", self.total_frames)

    @property
    def claimed_nbytes(self) -> int:
        """Bytes of the per-frame 'claimed' flags, page aligned."""
        return -(-(self.total_frames or 0) // 4096) * 4096

    @property
    def slots_offset(self) -> int:
        """Byte offset of the slots region in the segment (page aligned)."""
        return HEADER_NBYTES + self.claimed_nbytes

    @property
    def nbytes(self) -> int:
        """Bytes of the whole segment."""
        return self.slots_offset + self.ring_nbytes

    @property
    def ring_nbytes(self) -> int:
        """Bytes of the slots region alone, alignment padding included."""
        return self.layout.region_nbytes(self.slots)


class SlotRing:
    """A mapped ring: numpy views on the header, the claimed flags and the slots.

    Use :meth:`create` (the owner) or :meth:`attach` (everyone else).
    ``close()`` unmaps it in this process and is idempotent; ``unlink()``
    removes the segment and is called once, by the creator.
    """

    _mmap: mmap.mmap | None = None
    _owner = False

    def __init__(self, spec: RingSpec, mapping: mmap.mmap, *, owner: bool) -> None:
        self.spec = spec
        self._mmap, self._owner = mapping, owner
        self._base: np.ndarray[Any, np.dtype[np.uint8]] = np.frombuffer(mapping, dtype=np.uint8)
        self.header = self._base[:HEADER_NBYTES].view(np.int64)
        self.claimed = self._base[HEADER_NBYTES:spec.slots_offset]
        self._rows, self._stored_rows = _feature_rows(self._base, spec)

    @classmethod
    def create(cls, layout: SlotLayout, slots: int, total_frames: int | None) -> SlotRing:
        """Create a new ring segment with a fresh unique name."""
        spec = RingSpec(name=new_run_name(), layout=layout, slots=slots,
                        total_frames=total_frames)
        ring = cls(spec, create_segment(spec.name, spec.nbytes), owner=True)
        ring.header[Field.MAGIC] = RING_MAGIC
        ring.header[Field.SLOTS] = slots
        ring.header[Field.SLOT_EVENTS] = layout.slot_events
        ring.header[Field.TOTAL_FRAMES] = -1 if total_frames is None else total_frames
        ring.header[Field.NEWEST_FRAME] = -1
        return ring

    @classmethod
    def attach(cls, spec: RingSpec) -> SlotRing:
        """Map the ring described by ``spec``, created by another process."""
        return cls(spec, attach_segment(spec.name, spec.nbytes), owner=False)

    @property
    def closed(self) -> bool:
        """Whether this process has unmapped the ring."""
        return self._mmap is None

    def run_views(self, first_slot: int, nevents: int, *,
                  as_stored: bool = False) -> dict[str, np.ndarray[Any, Any]]:
        """Writable views of ``nevents`` events from the start of ``first_slot`` on.

        The events run on through the slots ``first_slot + 1``, ``first_slot + 2``,
        ... as needed, so each view is one contiguous array.

        Parameters
        ----------
        first_slot
            The first slot of the run.
        nevents
            Events of the run; may exceed ``slot_events``.
        as_stored
            View boolean features as the uint8 0/255 that producers store for
            them (see :class:`~shmwriter.Producer`).

        Returns
        -------
        dict of str to ndarray
            ``{feature: array of shape (nevents, *shape)}``, in schema order.

        Raises
        ------
        ValueError
            If ``first_slot`` is not a slot or the run passes the last slot.
        """
        per_slot, slots = self.spec.layout.slot_events, self.spec.slots
        if not 0 <= first_slot < slots:
            raise ValueError(f"first_slot must be in [0, {slots}); got {first_slot}")
        room = (slots - first_slot) * per_slot
        if nevents < 0:
            raise ValueError(f"nevents must be at least 0; got {nevents}")
        if nevents > room:
            raise ValueError(
                f"a run of nevents={nevents} from first_slot={first_slot} passes the last "
                f"slot: {slots} slots of {per_slot} events leave room for {room}")
        start = first_slot * per_slot
        rows = self._stored_rows if as_stored else self._rows
        return {name: block[start:start + nevents] for name, block in rows.items()}

    def slot_views(self, slot: int, nevents: int, *,
                   as_stored: bool = False) -> dict[str, np.ndarray[Any, Any]]:
        """Writable views of the first ``nevents`` events of every feature in ``slot``.

        With ``as_stored``, boolean features are viewed as the uint8 0/255 that
        producers store for them (see :class:`~shmwriter.Producer`).

        Raises
        ------
        ValueError
            If ``nevents`` is more than a slot holds, or ``slot`` is not a slot.
        """
        per_slot = self.spec.layout.slot_events
        if not 0 <= nevents <= per_slot:
            raise ValueError(f"nevents must be in [0, {per_slot}] (slot_events); got {nevents}")
        return self.run_views(slot, nevents, as_stored=as_stored)

    def row_views(self) -> dict[str, np.ndarray[Any, Any]]:
        """Each feature across all slots, ``(slots * slot_events, *shape)``, as stored.

        Row ``slot * slot_events + i`` is event ``i`` of ``slot``.
        """
        return dict(self._stored_rows)

    def get(self, field: Field) -> int:
        """One header counter."""
        return int(self.header[field])

    def set(self, field: Field, value: int) -> None:
        """Set one header counter (only the writer does)."""
        self.header[field] = value

    @property
    def state(self) -> State:
        """The run's life stage."""
        return State(int(self.header[Field.STATE]))

    @property
    def error_text(self) -> str:
        """The writer's error message, if it failed."""
        return error_text(self._base[:HEADER_NBYTES].tobytes())

    def set_error_text(self, text: str) -> None:
        """Store the writer's error message (truncated to 1 KiB)."""
        self._put_text(_ERROR_OFFSET, _ERROR_NBYTES, text)

    @property
    def path_text(self) -> str:
        """Path of the file the run writes."""
        return path_text(self._base[:HEADER_NBYTES].tobytes())

    def set_path_text(self, text: str) -> None:
        """Store the path of the file the run writes."""
        self._put_text(_PATH_OFFSET, _PATH_NBYTES, text)

    def _put_text(self, offset: int, nbytes: int, text: str) -> None:
        raw = text.encode("utf-8")[:nbytes - 1] + b"\0"
        self._base[offset:offset + len(raw)] = np.frombuffer(raw, np.uint8)

    def close(self) -> None:
        """Unmap the ring in this process. Views handed out keep it mapped until freed."""
        if self._mmap is None:
            return
        mapping, self._mmap = self._mmap, None
        self._base = self.header = self.claimed = None  # type: ignore[assignment]
        self._rows, self._stored_rows = {}, {}  # our own views would keep the mapping exported
        try:
            mapping.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes when it is freed

    def unlink(self) -> None:
        """Remove the segment (creator only, once); attached processes keep their mapping."""
        if self._owner:
            self._owner = False
            unlink_segment(self.spec.name)

    def __enter__(self) -> SlotRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        return (SlotRing.attach, (self.spec,))

    def __repr__(self) -> str:
        if self.closed:
            return f"<closed SlotRing {self.spec.name!r}>"
        return (f"<SlotRing {self.spec.name!r}: {self.spec.slots} slots × "
                f"{self.spec.layout.slot_nbytes} B, {self.get(Field.SLOTS_IN_USE)} in use>")


def _feature_rows(base: np.ndarray[Any, np.dtype[np.uint8]], spec: RingSpec,
                  ) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, np.ndarray[Any, Any]]]:
    """Each feature's block of the slots region as ``(slots * slot_events, *shape)`` arrays.

    Returns the views in the producers' dtypes and in the stored dtypes (these
    differ for masks only: bool and uint8).
    """
    layout = spec.layout
    nrows = spec.slots * layout.slot_events
    offsets = layout.block_offsets(spec.slots)
    rows, stored = {}, {}
    for (name, feature), offset in zip(layout.schema.items(), offsets, strict=True):
        start = spec.slots_offset + offset
        raw = base[start:start + feature.event_nbytes * nrows]
        rows[name] = raw.view(feature.dtype).reshape(nrows, *feature.shape)
        stored[name] = raw.view(feature.file_dtype).reshape(nrows, *feature.shape)
    return rows, stored
