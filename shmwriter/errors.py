"""Exceptions of shmwriter, each saying whose fault it was.

``ClosedError`` means *you* closed the object; ``BrokenError`` means the peer
(the writer or a producer) went away or failed; ``RingFullError`` means a wait
for a free slot ran out of time and may be retried; ``FrameError`` means the
data handed to a producer was rejected and nothing of that frame was accepted.
"""

from __future__ import annotations

import queue
from collections.abc import Sequence

from ._ranges import as_ranges

__all__ = [
    "AttachError",
    "BrokenError",
    "ClosedError",
    "FrameError",
    "MissingFramesError",
    "QueueFullError",
    "RingFullError",
    "ShmSpaceError",
    "ShmWriterError",
]


class ShmWriterError(Exception):
    """Base class of every exception raised by shmwriter."""


class ClosedError(ShmWriterError, RuntimeError):
    """The object was closed by its own side and cannot be used any more."""


class BrokenError(ShmWriterError, RuntimeError):
    """The other side (writer or producer) died or failed; ``__cause__`` says why."""


class AttachError(ShmWriterError, ConnectionRefusedError):
    """A ticket could not attach: another host or PID namespace, or the writer refused it."""


class RingFullError(ShmWriterError, TimeoutError):
    """No slot became free within the timeout: the writer is behind or stuck."""


class FrameError(ShmWriterError, ValueError):
    """A frame handed to a producer was rejected; it names the frame and feature.

    Nothing of the rejected frame was accepted and the run goes on.
    """

    def __init__(self, message: str, *, frame_index: object = None,
                 feature: str | None = None) -> None:
        super().__init__(message)
        #: The frame index the caller passed.
        self.frame_index = frame_index
        #: The feature at fault, or None when the frame as a whole was wrong.
        self.feature = feature


class MissingFramesError(ShmWriterError):
    """The run ended but some frames were never delivered.

    The file is complete and valid for every other frame; the missing indices
    are recorded in it (log ``shmwriter-missing-frames``, one line per range)
    and listed here.
    """

    def __init__(self, missing_frames: Sequence[int]) -> None:
        #: Indices of the frames that never arrived, ascending (kept as ranges).
        self.missing_frames = as_ranges(missing_frames)
        super().__init__(
            f"{len(self.missing_frames)} frame(s) were never delivered: "
            f"{self.missing_frames.summary(limit=10)}; pass allow_gaps=True to Writer to "
            f"accept gaps")

    def __reduce__(self) -> tuple[type[MissingFramesError], tuple[Sequence[int]]]:
        return (MissingFramesError, (self.missing_frames,))


class QueueFullError(RingFullError, queue.Full):
    """No slot (or no room for the descriptor) came free in time: ``queue.Full`` of an EventQueue.

    Raised by :meth:`shmwriter.EventQueue.put` with a ``timeout`` or ``block=False`` and
    by :meth:`shmwriter.EventQueue.put_nowait`. It is a ``queue.Full`` (as
    ``mp.Queue.put`` raises) and a :class:`~shmwriter.RingFullError`.
    """


class ShmSpaceError(ShmWriterError, MemoryError):
    """/dev/shm or memory cannot hold the slot ring that was asked for."""
