"""What an EventQueue's consumers hold: a frame left in its slots, and a reader.

:class:`EventLease` is one frame taken whose events still sit in the queue's
slots; :class:`EventReader` takes frames with a few more on their way (see
:class:`.client.FrameReader`).
"""

from __future__ import annotations

import math
import os
import queue
from typing import TYPE_CHECKING, Any

import numpy as np

from .._channel.records import Kind, encode_record
from ..errors import BrokenError, ClosedError
from .client import FrameReader, QueueClient

if TYPE_CHECKING:
    from ..eventqueue import EventQueue

__all__ = ["EventLease", "EventReader"]


class EventLease:
    """One received frame whose events still sit in the queue's slots.

    Get it from :meth:`EventQueue.lease`. :meth:`parts` gives read-only views
    into shared memory; :meth:`arrays` copies them. :meth:`release` hands the
    slots back (idempotent; also at the end of a ``with`` block). BEWARE: the
    views must not be used after the release; the slots are reused at once.
    """

    def __init__(self, queue: EventQueue, client: QueueClient, frame_index: int, nevents: int,
                 slots: list[int], *, none: bool) -> None:
        self._queue, self._client, self._slots, self._none = queue, client, slots, none
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
        if slots and os.getpid() == self._pid and not self._client.closed:
            try:
                self._client.send(encode_record(Kind.DONE, slots=slots))
            except (BrokenError, ClosedError):
                pass  # the hub is gone, or the queue closed here: nothing to give back to
            self._client.released_lease()

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


class EventReader:
    """Takes frames from an EventQueue with up to ``ahead`` of them on their way.

    Get it from :meth:`EventQueue.reader`; :meth:`close` it (or use it as a
    context manager) to return the frames it received and did not take.
    """

    def __init__(self, queue: EventQueue, reader: FrameReader) -> None:
        self._queue, self._reader = queue, reader

    def lease(self, timeout: float | None = None) -> EventLease:
        """The next frame, its events left in shared memory (see :meth:`EventQueue.lease`).

        Raises
        ------
        queue.Empty
            If no frame came within ``timeout`` (None: wait as long as it takes).
        BrokenError
            If the queue's creator closed it or exited.
        """
        if self._reader.client.closed:
            raise ClosedError("this EventReader is closed")
        record = self._reader.take(seconds(timeout))
        if record is None:
            raise queue.Empty
        return self._queue._lease_of(self._reader.client, record)

    def get(self, timeout: float | None = None,
            ) -> tuple[int, dict[str, np.ndarray[Any, Any]] | None]:
        """The next ``(frame_index, events)``, copied out (see :meth:`EventQueue.get`)."""
        with self.lease(timeout) as lease:
            return lease.frame_index, lease.arrays()

    def close(self) -> None:
        """Return the frames received and not taken to the queue; idempotent."""
        self._reader.close()

    def __enter__(self) -> EventReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def seconds(timeout: float | None) -> float:
    """A get's timeout in seconds: None waits as long as it takes."""
    return math.inf if timeout is None else max(0.0, float(timeout))
