"""Figures of a run, read from the ring header without locking or blocking the writer."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .ring import HEADER_NBYTES, Field, SlotRing, State, path_text

__all__ = ["RunStatistics", "header_statistics", "read_statistics"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunStatistics:
    """A snapshot of one run's progress (see :meth:`shmwriter.Writer.statistics`)."""

    state: str
    """STARTING, RUNNING, DONE, FAILED or ABORTED."""
    path: str
    """The file being written."""
    owner_pid: int
    """Process that created the run."""
    writer_pid: int
    """Process that runs the writer loop."""
    slots: int
    """Slots in the ring."""
    slots_in_use: int
    """Slots granted to producers or holding frames."""
    peak_slots_in_use: int
    """Most slots in use at once so far."""
    total_frames: int | None
    """Frames of the run, None when open-ended."""
    frames_done: int
    """Frames before this index are written or declared missing."""
    newest_frame: int
    """Highest frame index received, -1 before any."""
    written_frames: int
    """Frames whose events are in the file."""
    written_events: int
    """Events in the file."""
    written_nbytes: int
    """Bytes of event data handed to HDF5."""
    missing_frames: int
    """Frames declared missing so far."""
    rejected_frames: int
    """Descriptors the writer refused."""
    write_queue_size: int
    """Chunks waiting to be written."""
    stash_nbytes: int
    """Bytes of out-of-order frames copied out of the ring."""
    peak_stash_nbytes: int
    """Most such bytes at once."""
    descriptor_nbytes: int
    """Bytes received through all descriptor pipes: no array data, only descriptors."""
    producers_alive: int
    """Producers not yet closed, exited or dead."""
    elapsed_s: float
    """Seconds since the writer started."""

    @property
    def lag_frames(self) -> int:
        """How far the file is behind the newest frame received."""
        return max(0, self.newest_frame + 1 - self.frames_done)


def read_statistics(ring: SlotRing) -> RunStatistics:
    """Snapshot the header of ``ring`` (any process may call this)."""
    return header_statistics(ring.header.tobytes())


def header_statistics(header: bytes) -> RunStatistics:
    """The figures in ``header``, a copy of a ring's first 4096 bytes.

    ``shmwriter top`` uses it on headers it copied from segments it mapped
    read-only, without attaching a :class:`SlotRing`.

    Raises
    ------
    ValueError
        If ``header`` is shorter than a ring header or holds no valid state.
    """
    if len(header) < HEADER_NBYTES:
        raise ValueError(f"a ring header has {HEADER_NBYTES} bytes; got {len(header)}")
    h = np.frombuffer(header, dtype=np.int64, count=HEADER_NBYTES // 8)
    total = int(h[Field.TOTAL_FRAMES])
    start = int(h[Field.START_TIME_NS])
    return RunStatistics(
        state=State(int(h[Field.STATE])).name,
        path=path_text(header),
        owner_pid=int(h[Field.OWNER_PID]), writer_pid=int(h[Field.WRITER_PID]),
        slots=int(h[Field.SLOTS]), slots_in_use=int(h[Field.SLOTS_IN_USE]),
        peak_slots_in_use=int(h[Field.PEAK_SLOTS_IN_USE]),
        total_frames=None if total < 0 else total, frames_done=int(h[Field.FRAMES_DONE]),
        newest_frame=int(h[Field.NEWEST_FRAME]), written_frames=int(h[Field.WRITTEN_FRAMES]),
        written_events=int(h[Field.WRITTEN_EVENTS]), written_nbytes=int(h[Field.WRITTEN_NBYTES]),
        missing_frames=int(h[Field.MISSING_FRAMES]), rejected_frames=int(h[Field.REJECTED_FRAMES]),
        write_queue_size=int(h[Field.WRITE_QUEUE_SIZE]), stash_nbytes=int(h[Field.STASH_NBYTES]),
        peak_stash_nbytes=int(h[Field.PEAK_STASH_NBYTES]),
        descriptor_nbytes=int(h[Field.DESCRIPTOR_NBYTES]),
        producers_alive=int(h[Field.PRODUCERS_ALIVE]),
        elapsed_s=(time.time_ns() - start) / 1e9 if start else 0.0)
