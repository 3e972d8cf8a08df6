"""The producer endpoint: copies a frame's events into ring slots, sends a descriptor.

A :class:`Producer` is made by :meth:`shmwriter.Writer.producer` and handed to
one worker process (it pickles into ``spawn``-ed processes). Each frame is
checked completely before anything is sent, so a rejected frame raises a
:class:`~shmwriter.FrameError` here, in the worker, and the writer never sees it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from multiprocessing import context, reduction
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ._channel.link import WriterLink
from ._channel.records import (
    MAX_FRAMES_PER_RECORD,
    MAX_SLOTS_PER_RECORD,
    Kind,
    encode_packed,
    encode_record,
    split_packed,
)
from ._events import EventArrays, EventCheck, check_counts
from ._ring.fill import SlotFiller
from ._ring.ring import Field, RingSpec, SlotRing, State
from ._rtdc import MAX_FRAME_INDEX
from ._spec import Schema
from .errors import BrokenError, ClosedError, FrameError

if TYPE_CHECKING:
    from ._channel.attach import Ticket

__all__ = ["Producer"]

#: Header states in which a frame sent may not have been taken (see ``_send_frame``).
_STOPPED = frozenset({int(State.ABORTING), int(State.ABORTED), int(State.FAILED)})


class Producer:
    """Puts frames into the writer's ring. Use it in one process; close it when done.

    Parameters are internal: get producers from :meth:`shmwriter.Writer.producer`
    or :func:`shmwriter.attach`.

    Passed as an argument to a ``spawn``-ed ``multiprocessing`` process, a
    producer pickles as its ring's name and two pipe file descriptors, which
    the child inherits. Pickled any other way (a Ray or Dask task, a queue), it
    pickles as its run's ticket and attaches anew where it is unpickled. Give every worker
    process its own producer: the writer refuses a producer used by two
    processes at once. Threads of one process may share one. A producer
    unpickled in a new process tells the writer that process's pid at once,
    so the writer notices if that process dies, even before its first put.

    ``close()`` tells the writer this producer is done; it is idempotent and
    also called by ``__exit__``. A producer whose process dies is noticed by
    the writer, which takes back its slots.
    """

    _link: WriterLink | None = None
    _closed = False

    def __init__(self, spec: RingSpec, producer_id: int, desc_fd: int, grant_fd: int,
                 timeout_s: float, ticket: Ticket | None = None) -> None:
        self._spec, self._id, self._timeout_s = spec, producer_id, timeout_s
        self._ticket = ticket
        self._filler = SlotFiller(spec)
        self._check_events = EventCheck(spec.layout.schema)
        self._lock = threading.RLock()
        self._link = WriterLink(spec, producer_id, desc_fd, grant_fd, timeout_s,
                                self._filler.ring)
        self._grants = self._link.grants
        #: Frames this producer has put (in this process).
        self.frames_put = 0
        #: Events this producer has put (in this process).
        self.events_put = 0

    # -- public API -------------------------------------------------------------
    @property
    def schema(self) -> Schema:
        """The features every frame must have."""
        return self._spec.layout.schema

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def put(self, frame_index: int, events: EventArrays | None, *,
            timeout_s: float | None = None) -> None:
        """Put one frame: ``events`` maps every feature to ``nevents`` rows, or is None.

        Parameters
        ----------
        frame_index
            Index of the frame, ``0 <= frame_index < total_frames``, each put once.
        events
            ``{feature: array of shape (nevents, *feature.shape)}`` with the
            same ``nevents`` for every feature, or None for a frame without events.
        timeout_s
            How long to wait for free slots; defaults to the writer's ``timeout_s``.

        Raises
        ------
        FrameError
            If the frame index or any feature is invalid; nothing was sent.
        RingFullError
            If no slot became free within the timeout.
        BrokenError, ClosedError
            If the writer is gone, or this producer is closed. A BrokenError
            raised while the run aborts or fails means the frame may or may
            not be in the file; a put() that returned means it is in the file
            (or, in an aborted run, listed missing if an earlier frame never came).
        """
        with self._lock:
            self._check_open()
            index = self._check_frame_index(frame_index)
            if events is None:  # the common empty frame: no slot, just a descriptor
                self._send_frame(index, 0, [])
                return
            nevents, arrays = self._check_events(index, events)
            slots = self._acquire(index, nevents, timeout_s)
            self._copy_into(slots, arrays, nevents, self._filler.copy_in)
            self._send_frame(index, nevents, slots)

    def put_many(self, frames: Sequence[int] | npt.NDArray[np.integer[Any]],
                 nevents: Sequence[int] | npt.NDArray[np.integer[Any]],
                 events: EventArrays | None, *, timeout_s: float | None = None) -> None:
        """Put a batch of frames in one call: checked once, sent as one descriptor (or a few).

        Parameters
        ----------
        frames
            The frame indices, in any order, each put once.
        nevents
            The event count of each of those frames (0 for a frame without events).
        events
            ``{feature: array of shape (sum(nevents), *feature.shape)}``: the events
            of those frames, concatenated in the order of ``frames``. None if there
            are no events at all.
        timeout_s
            How long to wait for free slots, each time; defaults to the writer's.

        Raises
        ------
        FrameError
            If a frame index, an event count or any feature is invalid, naming the
            frame or the feature; nothing of the batch was sent.
        RingFullError
            If no slots became free within the timeout. A batch needing more than
            half the ring goes in parts: the frames before the one named were put.
        BrokenError, ClosedError
            As for :meth:`put`.
        """
        with self._lock:
            self._check_open()
            pairs = self._check_batch(frames, nevents)
            arrays = self._check_events.batch(pairs, events)
            start = 0
            for part in split_packed(pairs, self._spec.layout.slots_for, self._most_run_slots()):
                self._put_packed(part, arrays, start, timeout_s)
                start += sum(count for _, count in part)

    def put_nowait(self, frame_index: int, events: EventArrays | None) -> None:
        """Like :meth:`put`, but raise :class:`RingFullError` at once if no slot is free."""
        self.put(frame_index, events, timeout_s=0.0)

    @contextlib.contextmanager
    def frame(self, frame_index: int, nevents: int, *,
              timeout_s: float | None = None) -> Iterator[dict[str, np.ndarray[Any, Any]]]:
        """Fill a frame in place: yields ``{feature: writable (nevents, *shape) array}``.

        When the frame fits one slot (``nevents <= slot_events``) the arrays
        are views into shared memory and nothing is copied. A larger frame
        gets private arrays that are copied into its slots on exit. The frame
        is sent when the block ends without an exception; on an exception its
        slots are kept for the next frame and nothing is sent.

        BEWARE: the arrays start with whatever bytes the slot held before;
        write every element of every feature. They become read-only on exit.
        """
        with self._lock:
            self._check_open()
            index = self._check_frame_index(frame_index)
            if isinstance(nevents, bool) or not isinstance(nevents, int | np.integer) \
                    or nevents < 0:
                raise FrameError(f"frame {index}: nevents must be an int >= 0; got {nevents!r}",
                                 frame_index=index)
            nevents = int(nevents)
            slots = self._acquire(index, nevents, timeout_s)
            zero_copy = len(slots) == 1
            if zero_copy:
                arrays = self._filler.ring().run_views(slots[0], nevents)
            else:
                arrays = {name: np.empty((nevents, *f.shape), f.dtype)
                          for name, f in self.schema.items()}
            with self._filling(arrays, slots, in_ring=zero_copy):
                yield arrays
            if not zero_copy:
                self._filler.copy_in(slots, arrays, nevents)
            self._send_frame(index, nevents, slots)

    @contextlib.contextmanager
    def frames(self, frames: Sequence[int] | npt.NDArray[np.integer[Any]],
               nevents: Sequence[int] | npt.NDArray[np.integer[Any]], *,
               timeout_s: float | None = None) -> Iterator[dict[str, np.ndarray[Any, Any]]]:
        """Fill a batch of frames in place, with no copy at all.

        Yields ``{feature: writable array of shape (sum(nevents), *shape)}``:
        views of shared memory, contiguous, holding the events of ``frames``
        back to back in the order of ``frames`` (as for :meth:`put_many`).
        The batch is sent as one descriptor when the block ends without an
        exception; on an exception nothing is sent and the slots are kept for
        the next frames.

        Parameters
        ----------
        frames
            The frame indices, in any order, each put once; at most 340.
        nevents
            The event count of each of those frames.
        timeout_s
            How long to wait for the slots; defaults to the writer's.

        Raises
        ------
        FrameError
            If a frame index or an event count is invalid, or the batch needs
            more than half of the ring's slots; nothing was sent.
        ValueError
            If ``frames`` lists more frames than one descriptor can carry (340).
        RingFullError, BrokenError, ClosedError
            As for :meth:`put`.

        Notes
        -----
        The events of a batch take ``ceil(sum(nevents) / slot_events)``
        consecutive slots; the writer grants such a run once enough
        consecutive slots are free. With ``timeout_s=0`` it answers at once:
        the run, or a RingFullError if no such run is free now.
        BEWARE: the arrays start with whatever bytes the slots held before;
        write every element of every feature. They become read-only on exit;
        do not keep them (or make them writeable again): the slots go back
        to the ring once the frames are written.
        """
        with self._lock:
            self._check_open()
            pairs = self._check_batch(frames, nevents)
            if len(pairs) > MAX_FRAMES_PER_RECORD:
                raise ValueError(f"frames() takes at most {MAX_FRAMES_PER_RECORD} frames; got "
                                 f"{len(pairs)} (put_many takes any number)")
            total = sum(count for _, count in pairs)
            nslots = self._spec.layout.slots_for(total)
            lowest = min((frame for frame, _ in pairs), default=0)
            if nslots > self._most_run_slots():
                raise FrameError(
                    f"the batch of {len(pairs)} frames from frame {lowest} has {total} events: "
                    f"{nslots} slots, more than half of the ring's {self._spec.slots}; put "
                    f"fewer frames at a time, or give the Writer slots >= 2 x producers x "
                    f"{nslots} (two such batches per producer)", frame_index=lowest)
            run = self._take_run(lowest, nslots, timeout_s) if nslots else []
            arrays = self._filler.run_views(run, total)
            with self._filling(arrays, run, in_ring=True):
                yield arrays
            if not pairs:
                return  # an empty batch: nothing to send
            self._send_described([frame for frame, _ in pairs], total, run,
                                 encode_packed(pairs, run[0] if run else 0))

    def close(self) -> None:
        """Tell the writer this producer is done and release its pipes. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._link is not None and self._link.pid == os.getpid():
                    unused = self._grants.unused[:MAX_SLOTS_PER_RECORD]
                    self._send(encode_record(Kind.RELEASE, slots=unused)
                               + encode_record(Kind.CLOSE))
            except (BrokenError, ClosedError, TimeoutError, OSError):
                pass  # the writer is done, gone or stuck: closing our ends is all that is left
            finally:
                self._release_os_resources()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self._release_os_resources()

    def __reduce__(self) -> tuple[Any, ...]:
        if self._closed:
            raise ClosedError("a closed Producer cannot be pickled; get a new one from "
                              "Writer.producer()")
        if context.get_spawning_popen() is None and self._ticket is not None:
            from ._channel.attach import attach_on_unpickle  # the child is not being started here
            return (attach_on_unpickle, (self._ticket,))
        link = self._check_link()
        return (_rebuild_producer, (self._spec, self._id, reduction.DupFd(link.desc_fd),
                                    reduction.DupFd(link.grant_fd), self._timeout_s,
                                    self._ticket))

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (f"<Producer {self._id} of {self._spec.name!r} ({state}): "
                f"{self.frames_put} frames, {self.events_put} events put>")

    # -- batches ----------------------------------------------------------------
    def _check_batch(self, frames: object, nevents: object) -> list[tuple[int, int]]:
        """The batch's ``(frame, nevents)``, each frame index checked and fitting the ring."""
        pairs, seen = [], set()
        for frame, count in check_counts(frames, nevents):
            index = self._check_frame_index(frame)
            if index in seen:
                raise FrameError(f"frame {index} is in the batch twice", frame_index=index)
            seen.add(index)
            self._check_fits(index, count, self._spec.layout.slots_for(count))
            pairs.append((index, count))
        return pairs

    def _put_packed(self, part: list[tuple[int, int]], arrays: Mapping[str, np.ndarray[Any, Any]],
                    start: int, timeout_s: float | None) -> None:
        """Put ``part`` (from :func:`split_packed`), whose events are rows ``start ..`` of
        ``arrays``: copied into one run of slots, one copy per feature, one record."""
        total = sum(count for _, count in part)
        rows = {name: a[start:start + total] for name, a in arrays.items()}
        nslots = self._spec.layout.slots_for(total)
        if nslots > self._most_run_slots():  # one frame too large for a run: as put() does
            (frame, _), = part
            slots = self._acquire(frame, total, timeout_s)
            self._copy_into(slots, rows, total, self._filler.copy_in)
            self._send_frame(frame, total, slots)
            return
        run = self._take_run(min(frame for frame, _ in part), nslots, timeout_s) \
            if nslots else []
        self._copy_into(run, rows, total, self._filler.copy_into_run)
        self._send_described([frame for frame, _ in part], total, run,
                             encode_packed(part, run[0] if run else 0))

    def _copy_into(self, slots: list[int], rows: Mapping[str, np.ndarray[Any, Any]],
                   nevents: int, copy: Callable[[list[int], Mapping[str, np.ndarray[Any, Any]],
                                                 int], None]) -> None:
        """``copy(slots, rows, nevents)``; on a failure the slots are kept for later frames."""
        try:
            if nevents:
                copy(slots, rows, nevents)
        except BaseException:
            self._grants.keep(slots)
            raise

    def _most_run_slots(self) -> int:
        """Most slots one run may have: half the ring (the writer grants no more)."""
        return max(1, self._spec.slots // 2)

    # -- slots ------------------------------------------------------------------
    def _acquire(self, frame_index: int, nevents: int, timeout_s: float | None) -> list[int]:
        nslots = self._spec.layout.slots_for(nevents)
        if nslots == 0:
            return []
        self._check_fits(frame_index, nevents, nslots)
        timeout = self._timeout(timeout_s)
        if timeout == 0:  # the writer answers at once: granted, or a RingFullError now
            return self._grants.take_now(frame_index, nslots, self._timeout_s)
        return self._grants.take(frame_index, nslots, timeout)

    def _take_run(self, frame_index: int, nslots: int, timeout_s: float | None) -> list[int]:
        """``nslots`` consecutive slots; at once or RingFullError with a timeout of 0."""
        timeout = self._timeout(timeout_s)
        if timeout == 0:  # the writer answers at once: a run, or a RingFullError now
            return self._grants.take_run_now(frame_index, nslots, self._timeout_s)
        return self._grants.take_run(frame_index, nslots, timeout)

    def _timeout(self, timeout_s: float | None) -> float:
        return self._timeout_s if timeout_s is None else timeout_s

    @contextlib.contextmanager
    def _filling(self, arrays: dict[str, np.ndarray[Any, Any]], slots: list[int], *,
                 in_ring: bool) -> Iterator[None]:
        """The caller's block fills ``arrays`` for ``slots``; read-only afterwards.

        Boolean features filled ``in_ring`` (in shared memory) are turned into the
        bytes the file stores. On an exception the slots are kept for the next frames.
        """
        try:
            yield
            if in_ring:
                self._filler.store_masks_as_bytes(arrays)
        except BaseException:
            self._grants.keep(slots)
            raise
        finally:
            for array in arrays.values():
                array.flags.writeable = False

    def _check_fits(self, frame_index: int, nevents: int, nslots: int) -> None:
        limit = min(self._spec.slots, MAX_SLOTS_PER_RECORD)
        if nslots > limit:
            most = limit * self._spec.layout.slot_events
            raise FrameError(
                f"frame {frame_index} has {nevents} events but one frame can hold at most "
                f"{most} (slots × slot_events); raise slot_events", frame_index=frame_index)

    # -- descriptors ------------------------------------------------------------
    def _send_frame(self, frame_index: int, nevents: int, slots: list[int]) -> None:
        self._send_described([frame_index], nevents, slots,
                             encode_record(Kind.FRAME, frame_index, nevents, slots))

    def _send_described(self, frames: list[int], nevents: int, slots: list[int],
                        record: bytes) -> None:
        """Claim ``frames`` (``nevents`` in all), send their ``record``; on failure the
        slots go back to the cache and the frames are unclaimed."""
        ring = self._attached_ring()
        claimed = ring.claimed if self._spec.total_frames is not None else None
        # a single frame (the common case) by scalar indexing: a fancy index costs microseconds
        index: int | list[int] = frames[0] if len(frames) == 1 else frames
        if claimed is not None:
            taken = claimed[index]
            if taken if isinstance(index, int) else taken.any():  # put meanwhile elsewhere
                frame = frames[int(np.argmax(taken))] if isinstance(index, list) else index
                self._grants.keep(slots)
                raise FrameError(f"frame {frame} was already put", frame_index=frame)
            claimed[index] = 1
        try:
            self._send(record)
        except BaseException:
            if claimed is not None:
                claimed[index] = 0
            self._grants.keep(slots)
            raise
        # the writer says ABORTING before it reads the last descriptors: seen after
        # sending, the frames may have come too late, so this put() must not return
        if int(ring.header[Field.STATE]) in _STOPPED:
            raise BrokenError(f"frame {frames[0]} was sent while the run stopped, so it may "
                              f"be missing from the file: {self._check_link().ring_error()}")
        self.frames_put += len(frames)
        self.events_put += nevents

    def _send(self, message: bytes) -> None:
        self._check_link().send(message)

    def _say_hello(self) -> None:
        """Tell the writer which process uses this producer (best effort; put() retries)."""
        self._check_link().say_hello()

    # -- checks and errors ------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this Producer was closed; get a new one from Writer.producer()")

    def _check_frame_index(self, frame_index: object) -> int:
        if type(frame_index) is not int and (
                isinstance(frame_index, bool) or not isinstance(frame_index, int | np.integer)):
            raise TypeError(f"frame_index must be an int; got {frame_index!r}")
        index, total = int(frame_index), self._spec.total_frames
        if index < 0:
            raise FrameError(f"frame index must be >= 0; got {index}", frame_index=index)
        if index > MAX_FRAME_INDEX:
            raise FrameError(f"frame index {index} is too large: the file stores frame indices "
                             f"as uint32 (at most {MAX_FRAME_INDEX})", frame_index=index)
        if total is not None and index >= total:
            raise FrameError(f"frame index {index} is out of range: the run has "
                             f"total_frames={total} (valid 0..{total - 1})", frame_index=index)
        ring = self._attached_ring()
        if total is not None:
            if ring.claimed[index]:
                raise FrameError(f"frame {index} was already put", frame_index=index)
        elif index < ring.get(Field.FRAMES_DONE):
            raise FrameError(f"frame {index} was already put: the writer is past it",
                             frame_index=index)
        return index

    def _attached_ring(self) -> SlotRing:
        return self._filler.ring()

    def _check_link(self) -> WriterLink:
        if self._link is None:
            raise ClosedError("this Producer was closed; get a new one from Writer.producer()")
        return self._link

    def _release_os_resources(self) -> None:
        if self._link is not None:
            self._link.close()
        self._filler.close()


def _rebuild_producer(spec: RingSpec, producer_id: int, desc: Any, grant: Any,
                      timeout_s: float, ticket: Ticket | None) -> Producer:
    producer = Producer(spec, producer_id, desc.detach(), grant.detach(), timeout_s, ticket)
    producer._say_hello()
    return producer

