"""EventQueue: a drop-in for the ``multiprocessing.Queue`` of ``(frame_index, events)`` tuples.

Workers call ``queue.put((frame_index, events))`` exactly as with an
``mp.Queue``; the arrays are copied into slots of a shared-memory segment and
only a small descriptor (frame index, event count, slot numbers) travels
through a pipe. ``queue.get()`` returns the same tuple in any process.
Consumers that want the events without an intermediate copy use
:meth:`EventQueue.lease` and copy straight out of the slots, as the writers of
:mod:`shmwriter.compat.dcnum` do.

The slots are handed out by the queue's hub, a thread of the process that
created the queue, with the same protocol, allocator and liveness check as a
:class:`~shmwriter.Writer`'s loop: see :mod:`shmwriter._queue.hub`.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from ._channel.records import MAX_SLOTS_PER_RECORD, Kind, Record, encode_record
from ._events import EventCheck, infer_schema
from ._queue.client import (
    MAX_READ_AHEAD,
    FrameReader,
    QueueClient,
    QueueTicket,
    new_ticket,
    open_client,
)
from ._queue.hub import NO_EVENTS, QueueHub
from ._queue.leases import EventLease, EventReader, seconds
from ._queue.segment import QueueSegment, queue_nbytes
from ._ring.ring import Field, SlotRing
from ._spec import Schema
from ._validate import check_positive_int
from .errors import BrokenError, ClosedError, FrameError, QueueFullError

__all__ = ["EventLease", "EventQueue", "EventReader"]

logger = logging.getLogger(__name__)



class EventQueue:
    """A queue of ``(frame_index, events)`` tuples whose arrays travel through shared memory.

    Parameters
    ----------
    schema
        The features of every event. None (the default) infers the schema from
        the first events put (see Notes).
    slots
        Slots of the segment (default 64); only with a ``schema``.
    slot_events
        Events one slot holds; a frame with more events takes several slots.
    memory_budget_nbytes
        Bytes for the slots. With a ``schema`` it sets the number of slots
        (overriding ``slots``); without one, the slots are cut from it once the
        schema is known (default 64 MiB). The memory is reserved up front.

    Raises
    ------
    ShmSpaceError
        If /dev/shm or memory cannot hold the segment.

    Notes
    -----
    **Schema inference.** Without a ``schema``, the first frame put that has at
    least one event (in whichever process puts it first) defines it: one
    :class:`~shmwriter.Feature` per key of its ``events`` dict, in the dict's
    order, with that array's dtype and the shape of one event
    (``array.shape[1:]``). Frames without events (``None``, ``{}`` or arrays of
    length 0) are passed on without needing a schema. Every later frame with
    events must fit the schema as a frame put to a :class:`~shmwriter.Producer`
    must: the same feature names (none missing, none extra), the same shape per
    event, a dtype that casts safely (int32 into int64 is fine, float64 into
    float32 is not) and the same event count in every feature. A frame that
    does not fit raises :class:`~shmwriter.FrameError` in the process that put
    it, naming the frame and the feature; nothing of it is sent and the queue
    goes on.

    **Lifetime.** The queue pickles (into ``spawn``-ed processes as a
    ``Process`` argument, like an ``mp.Queue``, and anywhere else: it pickles
    into a small ticket without file descriptors), and any process of the same
    user on the same host can use it. Each thread that uses it attaches to the
    queue's hub on first use. The hub is a thread of the process that created
    the queue: the queue lives as long as that process keeps it open. Its
    :meth:`close` there, or its exit, ends the queue for every process (their
    calls raise :class:`~shmwriter.BrokenError`). The memory is freed by the
    kernel when the last process using it closes it or exits, however it
    exits: nothing is left in /dev/shm and nothing needs unlinking.

    **Differences from mp.Queue.** Items must be ``(int, dict or None)``
    tuples. Arrays come back in the schema's dtypes (in native byte order).
    A frame without events comes back as ``None`` if it was put as ``None``,
    otherwise as a dict of empty arrays of the schema's features. The
    creator's process must stay while others use the queue.

    **Waiting.** :meth:`put` waits for a free slot as the ``put`` of a bounded
    ``mp.Queue`` does: without a ``timeout`` for as long as it takes, with one
    until it runs out (then :class:`QueueFullError`, a ``queue.Full``). It
    never waits for a consumer that is gone: the hub takes back the slots of a
    process the moment it dies, and once some process took frames (``get``
    or ``lease``), a put that has to wait while no such process is left raises
    :class:`~shmwriter.BrokenError`. Before the first frame was taken, the
    queue's creator stands for the consumer. When slots are scarce, the put of
    the lowest frame index is served first.
    """

    _closed = False
    _hub: QueueHub | None = None
    _segment: QueueSegment | None = None

    def __init__(self, schema: Schema | None = None, *, slots: int | None = None,
                 slot_events: int = 4, memory_budget_nbytes: int | None = None) -> None:
        slot_events = check_positive_int("slot_events", slot_events)
        nbytes = queue_nbytes(schema, slots, slot_events, memory_budget_nbytes)
        segment = QueueSegment.create(nbytes, slot_events)
        try:
            if schema is not None:
                segment.write_schema(schema, inferred=False)
            self._hub = QueueHub(segment)
        except BaseException:
            segment.close()
            raise
        self._setup(new_ticket(self._hub.address, self._hub.secret, segment.name, nbytes),
                    segment)

    def _setup(self, ticket: QueueTicket, segment: QueueSegment | None) -> None:
        self._ticket, self._segment = ticket, segment
        self._schema: Schema | None = None
        self._lock = threading.Lock()  # guards the segment's mapping and the ring views
        self._local = threading.local()  # this thread's client
        self._clients: weakref.WeakSet[QueueClient] = weakref.WeakSet()
        # the first client stays while the queue is open here, even after its thread ended:
        # the hub counts a process that took frames as a consumer while it has a channel
        self._presence: QueueClient | None = None
        self._pid = os.getpid()

    # -- the mp.Queue interface ---------------------------------------------------------------
    def put(self, obj: tuple[int, Mapping[str, npt.ArrayLike] | None], block: bool = True,
            timeout: float | None = None) -> None:
        """Put ``(frame_index, events)``: copy the arrays into slots, send a descriptor.

        Parameters
        ----------
        obj
            ``(frame_index, {feature: array of shape (nevents, *shape)})``, or
            ``(frame_index, None)`` for a frame without events.
        block, timeout
            As for ``mp.Queue.put``: with ``block=True`` and ``timeout=None``
            (the default) wait for a free slot as long as the queue's consumer
            lives; with a ``timeout`` at most that many seconds; with
            ``block=False`` not at all.

        Raises
        ------
        FrameError
            If the events do not fit the schema (see the class Notes); nothing was sent.
        QueueFullError
            A ``queue.Full`` (and :class:`~shmwriter.RingFullError`): no slot
            came free within ``timeout`` (at once with ``block=False``).
        BrokenError
            If put would have to wait for a consumer and none is left (every
            process that took frames closed the queue or died), or the queue's
            creator closed it or exited.
        TypeError
            If ``obj`` is not a ``(frame_index, events)`` pair.
        ClosedError
            If this queue was closed in this process.
        """
        frame_index, events = _unpack(obj)
        client = self._client()
        nevents, arrays = self._prepare(client, frame_index, events)
        if nevents == 0:
            code = NO_EVENTS if events is None else 0
            client.send(encode_record(Kind.FRAME, frame_index, code))
            return
        slots = self._take_slots(client, frame_index, nevents, block, timeout)
        try:
            self._copy_into_slots(slots, arrays, nevents)
        except BaseException:
            client.grants.keep(slots)  # they serve the next frame
            raise
        client.send(encode_record(Kind.FRAME, frame_index, nevents, slots))

    def put_nowait(self, obj: tuple[int, Mapping[str, npt.ArrayLike] | None]) -> None:
        """Like :meth:`put` with ``block=False``: :class:`QueueFullError` if no slot is free."""
        self.put(obj, block=False)

    def get(self, block: bool = True,
            timeout: float | None = None) -> tuple[int, dict[str, np.ndarray[Any, Any]] | None]:
        """Take the next ``(frame_index, events)`` (arrays copied out of shared memory).

        ``timeout=None`` waits until a frame arrives, as ``mp.Queue.get`` does.

        Raises
        ------
        queue.Empty
            If nothing arrived within ``timeout`` (or at once, with ``block=False``).
        BrokenError
            If the queue's creator closed it or exited.
        ClosedError
            If this queue was closed in this process.
        """
        with self.lease(block, timeout) as lease:
            return lease.frame_index, lease.arrays()

    def get_nowait(self) -> tuple[int, dict[str, np.ndarray[Any, Any]] | None]:
        """Like :meth:`get` with ``block=False``."""
        return self.get(block=False)

    def qsize(self) -> int:
        """Frames put and not yet taken, now (may change at once, as for mp.Queue)."""
        return self._client().status()[1]

    def empty(self) -> bool:
        """Whether no frame is waiting right now (may change at once, as for mp.Queue)."""
        return self.qsize() == 0

    def full(self) -> bool:
        """Whether no slot is free now (a put with events would wait)."""
        return self._segment_now().ready and self.free_slots == 0

    def close(self) -> None:
        """Release this process's handles (idempotent); in the creator, end the queue.

        Other processes go on after they close theirs; when the creator closes
        it, their next call raises :class:`~shmwriter.BrokenError`.
        """
        if self._closed:
            return
        self._closed = True
        mine = getattr(self._local, "client", None)
        for client in list(self._clients):  # other threads' waits end with ClosedError
            if client is mine:
                client.close()
            else:
                client.shut()
        if self._hub is not None and self._pid == os.getpid():
            self._hub.stop()
        if self._segment is not None:
            self._segment.close()

    def join_thread(self) -> None:
        """Nothing to do: the queue has no feeder thread (kept for mp.Queue code)."""

    def cancel_join_thread(self) -> None:
        """Nothing to do: the queue has no feeder thread (kept for mp.Queue code)."""

    # -- zero-copy consumers --------------------------------------------------------------------
    def lease(self, block: bool = True, timeout: float | None = None) -> EventLease:
        """Take the next frame but leave its events in shared memory.

        The returned :class:`EventLease` holds the frame's slots until
        :meth:`EventLease.release` (or the end of a ``with`` block); copy out
        what you need before that. The first call makes this thread's channel
        one of the queue's consumers (until it closes or its process exits),
        whom waiting producers count on (see the class Notes).

        Raises
        ------
        queue.Empty
            If nothing arrived within ``timeout`` (or at once, with ``block=False``).
        BrokenError
            If the queue's creator closed it or exited.
        """
        client = self._client()
        now = not block or (timeout is not None and timeout <= 0)
        record = client.take_frame(now=now, timeout_s=seconds(timeout))
        if record is None:
            raise queue.Empty
        return self._lease_of(client, record)

    def reader(self, ahead: int = 8) -> EventReader:
        """A consumer that keeps up to ``ahead`` frames on their way to it.

        Each :meth:`get` or :meth:`lease` pays a round trip to the hub; a
        reader's frames are sent as they arrive, so it takes them at once.
        Frames it received and did not take go back to the front of the queue
        when it is closed (if its process dies instead, they are dropped, as a
        frame taken by a consumer that dies); leases it handed out stay valid
        until released. Use it as a context manager.

        Raises
        ------
        ValueError
            If ``ahead`` is not 1 to 8 (the frames on their way must fit the
            channel's pipe whatever their size).
        """
        ahead = check_positive_int("ahead", ahead)
        if ahead > MAX_READ_AHEAD:
            raise ValueError(f"ahead must be at most {MAX_READ_AHEAD}; got {ahead}")
        self._client()  # this process keeps a channel while the queue is open in it
        client, segment_fd = open_client(self._ticket)
        self._map_segment(segment_fd)
        self._clients.add(client)
        return EventReader(self, FrameReader(client, ahead))

    def _lease_of(self, client: QueueClient, record: Record) -> EventLease:
        none = record.nevents == NO_EVENTS
        if record.slots:
            client.took_lease()
        return EventLease(self, client, record.value, 0 if none else record.nevents,
                          list(record.slots), none=none)

    # -- information ----------------------------------------------------------------------------
    @property
    def schema(self) -> Schema | None:
        """The features of every event; None until given or inferred."""
        if self._schema is None and not self._closed:
            self._load_schema()
        return self._schema

    @property
    def slots(self) -> int | None:
        """Slots of the segment; None until the schema is known."""
        segment = self._segment_now()
        return segment.slots if segment.ready else None

    @property
    def slot_events(self) -> int:
        """Events one slot holds."""
        return self._segment_now().slot_events

    @property
    def free_slots(self) -> int:
        """Slots free right now (0 until the schema is known)."""
        return self._client().status()[0]

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called in this process."""
        return self._closed

    def __enter__(self) -> EventQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        self._check_open()
        return (_rebuild_queue, (self._ticket,))

    def __repr__(self) -> str:
        if self._closed:
            return "<closed EventQueue>"
        segment = self._segment_now()
        if not segment.ready:
            return (f"<EventQueue {segment.name!r}: schema not known yet, "
                    f"{segment.nbytes} bytes>")
        features = len(self.schema or ())
        return (f"<EventQueue {segment.name!r}: {features} features, "
                f"{segment.slots} slots × {segment.slot_events} events, "
                f"{self.free_slots} free>")

    # -- internals ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this EventQueue was closed in this process")
        if self._pid != os.getpid():  # forked: the parent's channels and hub are not ours
            self._hub = None
            self._setup(self._ticket, self._segment)

    def _client(self) -> QueueClient:
        """This thread's channel to the hub (attached on first use)."""
        self._check_open()
        client: QueueClient | None = getattr(self._local, "client", None)
        if client is not None and not client.closed:
            return client
        client, segment_fd = open_client(self._ticket)
        self._map_segment(segment_fd)
        self._local.client = client
        self._clients.add(client)
        if self._presence is None:
            self._presence = client
        return client

    def _map_segment(self, segment_fd: int) -> None:
        """Map the segment the hub passed, unless it is mapped already."""
        with self._lock:
            if self._segment is None:
                self._segment = QueueSegment.attach(self._ticket.name, segment_fd,
                                                    self._ticket.nbytes)
            else:
                os.close(segment_fd)

    def _segment_now(self) -> QueueSegment:
        """The segment, mapped (attaching to the hub for it if need be)."""
        self._check_open()
        if self._segment is None:
            self._client()
        assert self._segment is not None
        return self._segment

    def _load_schema(self) -> Schema | None:
        segment = self._segment_now()
        with self._lock:
            if self._schema is None and segment.ready:
                self._schema = segment.stored_schema()
        return self._schema

    def _ring(self) -> SlotRing:
        """The slot views (the schema must be known)."""
        segment = self._segment_now()
        schema = self._load_schema()
        if schema is None:
            raise BrokenError("a frame with events arrived before the queue's schema was "
                              "published")
        with self._lock:
            return segment.bind_ring(schema)

    def _prepare(self, client: QueueClient, frame_index: int,
                 events: object) -> tuple[int, dict[str, np.ndarray[Any, Any]]]:
        """Check the events (inferring the schema if needed); return count and arrays."""
        if events is None:
            return 0, {}
        if not isinstance(events, Mapping):
            raise TypeError(f"frame {frame_index}: events must be a mapping of feature name to "
                            f"array, or None; got {type(events).__name__}")
        arrays = {name: _as_array(frame_index, name, value) for name, value in events.items()}
        for name, array in arrays.items():
            if array.ndim == 0:
                raise FrameError(f"frame {frame_index}: feature {name!r} is a scalar; expected "
                                 f"an array of shape (nevents, ...)", frame_index=frame_index,
                                 feature=str(name))
        if all(len(array) == 0 for array in arrays.values()):
            return 0, {}
        schema = self._schema_for(client, frame_index, arrays)
        try:
            return EventCheck(schema)(frame_index, arrays)
        except FrameError as exc:
            if not self._segment_now().header[Field.QUEUE_INFERRED]:
                raise
            raise FrameError(f"{exc} (this queue's schema was inferred from the first events "
                             f"put)", frame_index=exc.frame_index, feature=exc.feature) from None

    def _schema_for(self, client: QueueClient, frame_index: int,
                    arrays: Mapping[str, np.ndarray[Any, Any]]) -> Schema:
        schema = self._load_schema()
        if schema is not None:
            return schema
        inferred = infer_schema(frame_index, arrays)
        EventCheck(inferred)(frame_index, arrays)  # a frame that cannot be put defines nothing
        if client.publish_turn():  # the hub lets one client publish; the others wait
            published = False
            try:
                self._segment_now().write_schema(inferred, inferred=True)
                published = True
            except ValueError as exc:
                raise ValueError(f"frame {frame_index}: {exc}") from None
            finally:
                client.published(ok=published)
        schema = self._load_schema()
        if schema is None:
            raise BrokenError("the queue's hub said the schema was published, but it is not")
        return schema

    def _take_slots(self, client: QueueClient, frame_index: int, nevents: int, block: bool,
                    timeout: float | None) -> list[int]:
        segment = self._segment_now()
        total = segment.slots
        nslots = -(-nevents // segment.slot_events)
        most = min(total, MAX_SLOTS_PER_RECORD)  # a frame's slots are listed in one record
        if nslots > most:
            raise FrameError(
                f"frame {frame_index} has {nevents} events but one frame can hold at most "
                f"{most * segment.slot_events} (slots × slot_events); raise slot_events or "
                f"the queue's memory budget", frame_index=frame_index)
        started = time.monotonic()
        try:
            slots = client.take_slots(frame_index, nslots, timeout if block else 0.0)
        except BrokenError as exc:
            raise BrokenError(f"frame {frame_index}: {exc}") from None
        if slots is not None:
            return slots
        free = client.status()[0]
        why = ("but puts that wait for more come first" if free >= nslots else
               "the consumer is behind or stuck")
        raise QueueFullError(f"frame {frame_index}: waited {time.monotonic() - started:.1f} s "
                             f"for {nslots} free slot(s); {free} of {total} are free: {why}")

    def _copy_into_slots(self, slots: list[int], arrays: Mapping[str, np.ndarray[Any, Any]],
                         nevents: int) -> None:
        ring = self._ring()
        per_slot = int(ring.spec.layout.slot_events)
        for j, slot in enumerate(slots):
            start, stop = j * per_slot, min((j + 1) * per_slot, nevents)
            views = ring.slot_views(slot, stop - start)
            for name, array in arrays.items():
                np.copyto(views[name], array[start:stop], casting="unsafe")


def _as_array(frame_index: int, name: object, value: object) -> np.ndarray[Any, Any]:
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:  # a ragged list, say
        raise FrameError(f"frame {frame_index}: feature {name!r} is not an array: {exc}",
                         frame_index=frame_index, feature=str(name)) from None


def _unpack(obj: object) -> tuple[int, object]:
    if not isinstance(obj, tuple | list) or len(obj) != 2:
        raise TypeError(f"put() takes a (frame_index, events) pair; got {obj!r:.80}")
    frame_index, events = obj
    if isinstance(frame_index, bool) or not isinstance(frame_index, int | np.integer):
        raise TypeError(f"frame_index must be an int; got {frame_index!r}")
    if not 0 <= frame_index < 2**63:
        raise FrameError(f"frame index must be >= 0; got {frame_index}",
                         frame_index=frame_index)
    return int(frame_index), events


def _rebuild_queue(ticket: QueueTicket) -> EventQueue:
    """How a pickled EventQueue comes back: it attaches to the hub on first use."""
    queue_ = EventQueue.__new__(EventQueue)
    queue_._setup(ticket, None)
    return queue_
