"""EventQueue: a drop-in for the ``multiprocessing.Queue`` of ``(frame_index, events)`` tuples.

Workers call ``queue.put((frame_index, events))`` exactly as with an
``mp.Queue``; the arrays are copied into slots of a shared-memory segment and
only a small descriptor (frame index, event count, slot numbers) travels
through a socket. ``queue.get()`` returns the same tuple in any process.
Consumers that want the events without an intermediate copy use
:meth:`EventQueue.lease` and copy straight out of the slots, as the writers of
:mod:`shmwriter.compat.dcnum` do.

How the pieces are shared between processes, and why no process can block
another forever, is described in :mod:`shmwriter._queue.shared`.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections.abc import Mapping
from multiprocessing import reduction
from typing import Any

import numpy as np
import numpy.typing as npt

from ._channel.records import MAX_SLOTS_PER_RECORD, Kind, encode_record
from ._events import check_events
from ._queue.shared import (
    IN_FLIGHT,
    QueueShared,
    budget_nbytes,
    lock_publish,
    segment_nbytes,
    slots_that_fit,
    unlock_publish,
)
from ._ring.ring import MAX_SLOTS, Field, SlotRing
from ._spec import Feature, Schema, SlotLayout
from ._validate import check_positive_int
from .errors import BrokenError, ClosedError, FrameError, QueueFullError

__all__ = ["EventLease", "EventQueue"]

logger = logging.getLogger(__name__)

#: Segment budget when the schema is inferred and no budget is given.
DEFAULT_BUDGET_NBYTES = 64 * 2**20
_DEFAULT_SLOTS = 64
#: Event count sent for a frame put as ``(index, None)``, so that get() returns None again.
_NO_EVENTS = 2**32 - 1
_WAIT_SLICE_S = 0.5  # longest single wait: dead holders and consumers are looked for between


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

    **Lifetime.** The queue pickles into ``spawn``-ed processes (pass it as a
    ``Process`` argument, like an ``mp.Queue``). Its memory is freed by the
    kernel when the last process using it closes it or exits, however it
    exits: nothing is left in /dev/shm and nothing needs unlinking.
    :meth:`close` releases this process's handles.

    **Differences from mp.Queue.** Items must be ``(int, dict or None)``
    tuples. Arrays come back in the schema's dtypes (in native byte order).
    A frame without events comes back as ``None`` if it was put as ``None``,
    otherwise as a dict of empty arrays of the schema's features.
    :meth:`qsize` is not available (as on macOS).

    **Waiting.** :meth:`put` waits for a free slot as the ``put`` of a bounded
    ``mp.Queue`` does: without a ``timeout`` for as long as it takes, with one
    until it runs out (then :class:`QueueFullError`, a ``queue.Full``). It
    never waits for a consumer that is gone: every 0.5 s it takes back the
    slots of dead holders and checks that some process that takes frames
    (``get`` or ``lease``) is still there, and raises
    :class:`~shmwriter.BrokenError` if none is (before the first frame was
    taken, the queue's creator stands for the consumer).
    """

    _shared: QueueShared | None = None
    _schema: Schema | None = None
    _closed = False

    def __init__(self, schema: Schema | None = None, *, slots: int | None = None,
                 slot_events: int = 4, memory_budget_nbytes: int | None = None) -> None:
        slot_events = check_positive_int("slot_events", slot_events)
        nbytes = _parse_size(schema, slots, slot_events, memory_budget_nbytes)
        self._shared = QueueShared.create(nbytes, slot_events)
        self._setup()
        if schema is not None:
            try:
                self._shared.publish(schema, inferred=False)
            except BaseException:
                self.close()
                raise
            self._schema = schema

    def _setup(self) -> None:
        self._schema = None
        self._lock = threading.Lock()  # guards the lazy schema and ring set-up
        self._next_reclaim = 0.0

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
            A ``queue.Full`` (and :class:`~shmwriter.RingFullError`): no slot,
            or no room in the descriptor channel, came free within ``timeout``
            (at once with ``block=False``).
        BrokenError
            If put would have to wait for a consumer and none is left: every
            process that took frames from the queue closed it or died (or,
            before any did, the queue's creator is gone).
        TypeError
            If ``obj`` is not a ``(frame_index, events)`` pair.
        ClosedError
            If this queue was closed in this process.
        """
        frame_index, events = _unpack(obj)
        if not block:
            deadline = time.monotonic()
        elif timeout is None:
            deadline = math.inf
        else:
            deadline = time.monotonic() + max(0.0, float(timeout))
        shared = self._check_open()
        nevents, arrays = self._prepare(frame_index, events, deadline)
        if nevents == 0:
            code = _NO_EVENTS if events is None else 0
            self._send(frame_index, encode_record(Kind.FRAME, frame_index, code), [], deadline)
            return
        slots = self._acquire(frame_index, nevents, deadline)
        try:
            self._copy_into_slots(slots, arrays, nevents)
            shared.owners[slots] = IN_FLIGHT
        except BaseException:
            shared.give_slots(slots)
            raise
        record = encode_record(Kind.FRAME, frame_index, nevents, slots)
        self._send(frame_index, record, slots, deadline)

    def put_nowait(self, obj: tuple[int, Mapping[str, npt.ArrayLike] | None]) -> None:
        """Like :meth:`put` with ``block=False``: :class:`QueueFullError` if no slot is free."""
        self.put(obj, block=False)

    def get(self, block: bool = True,
            timeout: float | None = None) -> tuple[int, dict[str, np.ndarray[Any, Any]] | None]:
        """Take the next ``(frame_index, events)`` (arrays copied out of shared memory).

        ``timeout=None`` waits until a frame arrives, as ``mp.Queue.get`` does;
        meanwhile, every 0.5 s, it takes back the slots of dead holders.

        Raises
        ------
        queue.Empty
            If nothing arrived within ``timeout`` (or at once, with ``block=False``).
        ClosedError
            If this queue was closed in this process.
        """
        with self.lease(block, timeout) as lease:
            return lease.frame_index, lease.arrays()

    def get_nowait(self) -> tuple[int, dict[str, np.ndarray[Any, Any]] | None]:
        """Like :meth:`get` with ``block=False``."""
        return self.get(block=False)

    def empty(self) -> bool:
        """Whether no frame is waiting right now (may change at once, as for mp.Queue)."""
        return self._check_open().empty()

    def full(self) -> bool:
        """Whether no slot is free now (a put with events would wait)."""
        shared = self._check_open()
        return shared.ready and shared.free_tokens() == 0

    def qsize(self) -> int:
        """Not available: descriptors are counted by no one (raises NotImplementedError)."""
        raise NotImplementedError("EventQueue.qsize() is not available; use empty()")

    def close(self) -> None:
        """Release this process's handles on the queue. Idempotent; other processes go on."""
        if self._closed:
            return
        self._closed = True
        if self._shared is not None:
            self._shared.close()

    def join_thread(self) -> None:
        """Nothing to do: the queue has no feeder thread (kept for mp.Queue code)."""

    def cancel_join_thread(self) -> None:
        """Nothing to do: the queue has no feeder thread (kept for mp.Queue code)."""

    # -- zero-copy consumers --------------------------------------------------------------------
    def lease(self, block: bool = True, timeout: float | None = None) -> EventLease:
        """Take the next frame but leave its events in shared memory.

        The returned :class:`EventLease` holds the frame's slots until
        :meth:`EventLease.release` (or the end of a ``with`` block); copy out
        what you need before that. The first call makes this process one of
        the queue's consumers (until it closes the queue or exits), whom
        waiting producers check for (see the class Notes).

        Raises
        ------
        queue.Empty
            If nothing arrived within ``timeout`` (or at once, with ``block=False``).
        """
        shared = self._check_open()
        shared.register_consumer()
        if not block:
            deadline: float | None = time.monotonic()
        elif timeout is None:
            deadline = None
        else:
            deadline = time.monotonic() + max(0.0, float(timeout))
        while True:
            wait = _WAIT_SLICE_S if deadline is None else min(
                _WAIT_SLICE_S, deadline - time.monotonic())
            record = shared.receive(wait)
            if record is not None:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise queue.Empty
            self._reclaim_now_and_then()
        if record.kind != Kind.FRAME:
            raise BrokenError(f"the queue received a record of kind {record.kind}; expected "
                              f"frames only")
        slots = list(record.slots)
        shared.owners[slots] = -os.getpid()
        nevents = 0 if record.nevents == _NO_EVENTS else record.nevents
        return EventLease(self, record.value, nevents, slots, none=record.nevents == _NO_EVENTS)

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
        shared = self._check_open()
        return int(shared.header[Field.SLOTS]) if shared.ready else None

    @property
    def slot_events(self) -> int:
        """Events one slot holds."""
        return int(self._check_open().header[Field.SLOT_EVENTS])

    @property
    def free_slots(self) -> int:
        """Slots free right now."""
        return self._check_open().free_tokens()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called in this process."""
        return self._closed

    def __enter__(self) -> EventQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._shared is not None and not self._shared.closed:
            self._shared.close()

    def __reduce__(self) -> tuple[Any, ...]:
        shared = self._check_open()
        fds = tuple(reduction.DupFd(fd) for fd in shared.fds())
        return (_rebuild_queue, (shared.name, shared.nbytes, fds))

    def __repr__(self) -> str:
        if self._closed or self._shared is None:
            return "<closed EventQueue>"
        shared = self._shared
        if not shared.ready:
            return f"<EventQueue {shared.name!r}: schema not known yet, {shared.nbytes} bytes>"
        features = len(self.schema or ())
        return (f"<EventQueue {shared.name!r}: {features} features, "
                f"{shared.header[Field.SLOTS]} slots × {shared.header[Field.SLOT_EVENTS]} events, "
                f"{shared.free_tokens()} free>")

    # -- internals ----------------------------------------------------------------------------
    def _check_open(self) -> QueueShared:
        if self._closed or self._shared is None:
            raise ClosedError("this EventQueue was closed in this process")
        return self._shared

    def _load_schema(self) -> Schema | None:
        shared = self._check_open()
        with self._lock:
            if self._schema is None and shared.ready:
                self._schema = shared.stored_schema()
        return self._schema

    def _ring(self) -> SlotRing:
        """The slot views (the schema must be known)."""
        shared = self._check_open()
        schema = self._load_schema()
        if schema is None:
            raise BrokenError("a frame with events arrived before the queue's schema was "
                              "published")
        with self._lock:
            return shared.bind_ring(schema)

    def _prepare(self, frame_index: int, events: object,
                 deadline: float) -> tuple[int, dict[str, np.ndarray[Any, Any]]]:
        """Check the events (inferring the schema if needed); return count and arrays."""
        if events is None:
            return 0, {}
        if not isinstance(events, Mapping):
            raise TypeError(f"frame {frame_index}: events must be a mapping of feature name to "
                            f"array, or None; got {type(events).__name__}")
        arrays = {name: np.asarray(value) for name, value in events.items()}
        for name, array in arrays.items():
            if array.ndim == 0:
                raise FrameError(f"frame {frame_index}: feature {name!r} is a scalar; expected "
                                 f"an array of shape (nevents, ...)", frame_index=frame_index,
                                 feature=str(name))
        if all(len(array) == 0 for array in arrays.values()):
            return 0, {}
        schema = self._schema_for(frame_index, arrays, deadline)
        try:
            return check_events(schema, frame_index, arrays)
        except FrameError as exc:
            if not self._check_open().header[Field.QUEUE_INFERRED]:
                raise
            raise FrameError(f"{exc} (this queue's schema was inferred from the first events "
                             f"put)", frame_index=exc.frame_index, feature=exc.feature) from None

    def _schema_for(self, frame_index: int, arrays: Mapping[str, np.ndarray[Any, Any]],
                    deadline: float) -> Schema:
        schema = self._load_schema()
        if schema is not None:
            return schema
        shared = self._check_open()
        # the schema is being published by someone else (that takes microseconds, and the
        # kernel drops the lock of a publisher that dies): wait at least a little
        soon = time.monotonic() + 5.0
        if lock_publish(shared, soon if deadline == math.inf else max(deadline, soon)):
            try:
                shared.publish(_infer_schema(frame_index, arrays), inferred=True)
            finally:
                unlock_publish(shared)
        schema = self._load_schema()
        assert schema is not None
        return schema

    def _acquire(self, frame_index: int, nevents: int, deadline: float) -> list[int]:
        shared = self._check_open()
        slot_events, total = int(shared.header[Field.SLOT_EVENTS]), int(shared.header[Field.SLOTS])
        nslots = -(-nevents // slot_events)
        most = min(total, MAX_SLOTS_PER_RECORD)
        if nslots > most:
            raise FrameError(
                f"frame {frame_index} has {nevents} events but one frame can hold at most "
                f"{most * slot_events} (slots × slot_events); raise slot_events or the "
                f"queue's memory budget", frame_index=frame_index)
        started = next_check = time.monotonic()
        while not (slots := shared.take_slots(nslots)):
            now = time.monotonic()
            if now >= deadline:
                raise QueueFullError(
                    f"frame {frame_index}: waited {now - started:.1f} s for {nslots} free "
                    f"slot(s); {shared.free_tokens()} of {total} are free: the consumer is "
                    f"behind or stuck")
            if now >= next_check:
                next_check = now + _WAIT_SLICE_S
                if shared.reclaim_dead():
                    continue  # slots of dead holders came back: try them first
                self._check_consumer(frame_index)
            wait = min(deadline, next_check) - now
            if 0 < shared.free_tokens() < nslots:
                # some are free, not enough: no wait on the pipe says "n tokens", so poll
                time.sleep(min(0.002, wait))
            else:
                shared.wait_for_tokens(wait)  # blocks until a token comes (or the slice ends)
        return slots

    def _copy_into_slots(self, slots: list[int], arrays: Mapping[str, np.ndarray[Any, Any]],
                         nevents: int) -> None:
        ring = self._ring()
        per_slot = int(ring.spec.layout.slot_events)
        for j, slot in enumerate(slots):
            start, stop = j * per_slot, min((j + 1) * per_slot, nevents)
            views = ring.slot_views(slot, stop - start)
            for name, array in arrays.items():
                np.copyto(views[name], array[start:stop], casting="unsafe")

    def _send(self, frame_index: int, record: bytes, slots: list[int], deadline: float) -> None:
        shared = self._check_open()
        started = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                try:
                    shared.send(record, max(0.0, min(deadline, now + _WAIT_SLICE_S) - now))
                    return
                except TimeoutError:
                    if time.monotonic() >= deadline:
                        raise QueueFullError(
                            f"frame {frame_index}: no consumer took a frame for "
                            f"{time.monotonic() - started:.1f} s and the descriptor channel "
                            f"is full") from None
                    self._check_consumer(frame_index)
        except BaseException:
            shared.give_slots(slots)
            raise

    def _check_consumer(self, frame_index: int) -> None:
        """Raise BrokenError if no process that takes frames from the queue is left."""
        shared = self._check_open()
        state = shared.consumers_alive()
        if state == "alive":
            return
        if state == "none yet":
            if shared.creator_alive():
                return  # no frame was taken yet: the creator stands for the consumer
            raise BrokenError(
                f"frame {frame_index}: no process has taken a frame from this queue and its "
                f"creator (pid {int(shared.header[Field.OWNER_PID])}) is gone")
        pid = int(shared.header[Field.QUEUE_CONSUMER_PID])
        raise BrokenError(f"frame {frame_index}: the queue's consumer (pid {pid}) is gone: no "
                          f"process takes frames from it any more")

    def _reclaim_now_and_then(self) -> None:
        now = time.monotonic()
        if now >= self._next_reclaim:
            self._next_reclaim = now + _WAIT_SLICE_S
            self._check_open().reclaim_dead()


class EventLease:
    """One received frame whose events still sit in the queue's slots.

    Get it from :meth:`EventQueue.lease`. :meth:`parts` gives read-only views
    into shared memory; :meth:`arrays` copies them. :meth:`release` hands the
    slots back (idempotent; also at the end of a ``with`` block). BEWARE: the
    views must not be used after the release; the slots are reused at once.
    """

    def __init__(self, queue: EventQueue, frame_index: int, nevents: int, slots: list[int], *,
                 none: bool) -> None:
        self._queue, self._slots, self._none = queue, slots, none
        self._pid = os.getpid()
        #: The frame index it was put with.
        self.frame_index = frame_index
        #: Events of the frame.
        self.nevents = nevents

    @property
    def nslots(self) -> int:
        """Slots this lease holds."""
        return len(self._slots)

    def parts(self) -> list[tuple[dict[str, np.ndarray[Any, Any]], int]]:
        """``(views by feature, events)`` per slot, in event order; [] without events."""
        if not self._slots:
            return []
        ring = self._queue._ring()
        per_slot = int(ring.spec.layout.slot_events)
        parts = []
        for j, slot in enumerate(self._slots):
            count = min(per_slot, self.nevents - j * per_slot)
            views = ring.slot_views(slot, count)
            for view in views.values():
                view.flags.writeable = False
            parts.append((views, count))
        return parts

    def arrays(self) -> dict[str, np.ndarray[Any, Any]] | None:
        """The events as new arrays; None if the frame was put as ``(index, None)``."""
        if self._none:
            return None
        schema = self._queue.schema
        if self.nevents == 0:
            return {} if schema is None else {
                name: np.empty((0, *f.shape), f.dtype) for name, f in schema.items()}
        assert schema is not None
        arrays = {name: np.empty((self.nevents, *f.shape), f.dtype) for name, f in schema.items()}
        start = 0
        for views, count in self.parts():
            for name, view in views.items():
                arrays[name][start:start + count] = view
            start += count
        return arrays

    def release(self) -> None:
        """Hand the slots back to the queue. Idempotent."""
        slots, self._slots = self._slots, []
        if slots and os.getpid() == self._pid and not self._queue.closed:
            self._queue._check_open().give_slots(slots)

    def __enter__(self) -> EventLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # a safety net at garbage collection: never raise from here
            pass

    def __repr__(self) -> str:
        state = f"{len(self._slots)} slot(s) held" if self._slots else "released"
        return f"<EventLease frame {self.frame_index}: {self.nevents} events, {state}>"


def _infer_schema(frame_index: int, arrays: Mapping[str, np.ndarray[Any, Any]]) -> Schema:
    """One Feature per array: its dtype and the shape of one event."""
    features = {}
    for name, array in arrays.items():
        try:
            features[name] = Feature(array.dtype, array.shape[1:])
        except (TypeError, ValueError) as exc:
            raise FrameError(f"frame {frame_index}: feature {name!r} (dtype {array.dtype}, "
                             f"shape {array.shape}) cannot be a feature: {exc}",
                             frame_index=frame_index, feature=str(name)) from None
    try:
        return Schema(features)
    except (TypeError, ValueError) as exc:
        raise FrameError(f"frame {frame_index}: {exc}", frame_index=frame_index) from None


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


def _parse_size(schema: Schema | None, slots: int | None, slot_events: int,
                memory_budget_nbytes: int | None) -> int:
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


def _rebuild_queue(name: str, nbytes: int, fds: tuple[Any, ...]) -> EventQueue:
    queue_ = EventQueue.__new__(EventQueue)
    segment, send, recv, token_read, token_write = (fd.detach() for fd in fds)
    queue_._shared = QueueShared.from_fds(name, nbytes,
                                          (segment, send, recv, token_read, token_write))
    queue_._setup()
    return queue_
