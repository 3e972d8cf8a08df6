"""The runs of this user, seen from outside: discovery, figures, leftovers.

Every run's ring is a segment ``/dev/shm/shmw_<ownerpid>_<hex>`` (see
:func:`shmwriter._ring.segment.new_run_name`). This module lists them, reads their
headers and judges whether their owner still lives; ``shmwriter top`` and
``shmwriter clean`` are built on it.

Reading is strictly passive: a segment is opened read-only and only its first
4096 bytes (the header) are mapped, copied and unmapped. Nothing here creates,
writes or registers a segment with ``multiprocessing``'s resource tracker, and
the writer, which never locks its header, cannot be slowed down or blocked by
it. Only :func:`clean_leftovers` unlinks, and only segments whose owner is dead.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import re
import stat
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil

from .._ring.ring import HEADER_NBYTES, RING_MAGIC, Field, error_text
from .._ring.segment import NAME_PREFIX, SHM_DIR, unlink_segment
from .._ring.stats import RunStatistics, header_statistics
from .text import megabytes, rate, table

__all__ = [
    "RunSnapshot",
    "RunStatus",
    "Segment",
    "Verdict",
    "clean_leftovers",
    "find_segments",
    "format_clean",
    "format_statuses",
    "judge_segments",
    "run_statuses",
    "snapshot_runs",
]

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(rf"^{re.escape(NAME_PREFIX)}(\d+)_([0-9a-f]+)$")
#: psutil derives a start time from the boot time, which is known to about a
#: second; a process counts as started after a segment only beyond this margin.
_START_TOLERANCE_S = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Segment:
    """One run segment in /dev/shm, as the directory listing shows it."""

    name: str
    """Segment name, ``shmw_<ownerpid>_<hex>``."""
    name_pid: int
    """The owner pid written into the name."""
    nbytes: int
    """Size of the segment."""
    mtime: float
    """Last modification time (seconds since the epoch); not earlier than its creation."""

    @property
    def path(self) -> str:
        """Where the segment appears in the file system."""
        return os.path.join(SHM_DIR, self.name)


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """Whether a segment's owner lives, and why it was judged so."""

    segment: Segment
    """The segment judged."""
    header_pid: int
    """Owner pid in the header (``Field.OWNER_PID``), 0 if unset or unreadable."""
    owner_alive: bool
    """Whether the run's owner process still lives: then the segment is never removed."""
    reason: str
    """One line saying why."""
    removed: bool = False
    """Whether :func:`clean_leftovers` removed the segment."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSnapshot:
    """One read of a run's header."""

    verdict: Verdict
    """The segment and whether its owner lives."""
    statistics: RunStatistics | None
    """The header's figures; None if it holds no valid header (yet)."""
    error_text: str
    """The writer's error message, empty if none."""
    taken_s: float
    """``time.monotonic()`` when the header was copied."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunStatus:
    """A run's figures with rates from the difference of two snapshots."""

    snapshot: RunSnapshot
    """The newer snapshot."""
    events_per_s: float | None
    """Events written per second between the snapshots; None for a new run."""
    nbytes_per_s: float | None
    """Bytes of event data written per second; None for a new run."""
    frames_per_s: float | None
    """Frames written per second; None for a new run."""

    @property
    def statistics(self) -> RunStatistics:
        """The figures of the newer snapshot."""
        assert self.snapshot.statistics is not None
        return self.snapshot.statistics

    @property
    def ring_occupancy(self) -> float:
        """Fraction of the ring's slots in use, 0 to 1."""
        stats = self.statistics
        return stats.slots_in_use / stats.slots if stats.slots > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain-type form, for JSON."""
        verdict = self.snapshot.verdict
        return {"name": verdict.segment.name, "segment_nbytes": verdict.segment.nbytes,
                "owner_alive": verdict.owner_alive, **dataclasses.asdict(self.statistics),
                "lag_frames": self.statistics.lag_frames, "ring_occupancy": self.ring_occupancy,
                "events_per_s": self.events_per_s, "nbytes_per_s": self.nbytes_per_s,
                "frames_per_s": self.frames_per_s, "error": self.snapshot.error_text}


def find_segments(names: Collection[str] | None = None) -> list[Segment]:
    """The run segments of this user in /dev/shm, by name.

    Parameters
    ----------
    names
        Only these segments (all of this user's run segments if None).

    Raises
    ------
    FileNotFoundError
        If one of ``names`` is not a run segment of this user.
    """
    wanted = None if names is None else set(names)
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        entries = []
    found = []
    for entry in sorted(entries):
        match = _NAME_RE.match(entry)
        if match is None or (wanted is not None and entry not in wanted):
            continue
        try:
            info = os.lstat(os.path.join(SHM_DIR, entry))
        except FileNotFoundError:
            continue  # its run ended meanwhile
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            continue
        found.append(Segment(name=entry, name_pid=int(match[1]), nbytes=info.st_size,
                             mtime=info.st_mtime))
    if wanted is not None:
        unknown = sorted(wanted - {s.name for s in found})
        if unknown:
            raise FileNotFoundError(f"no run segment of this user named {unknown[0]!r} in "
                                    f"{SHM_DIR}; run 'shmwriter clean --dry-run' to list them")
    return found


def read_header(segment: Segment) -> bytes | None:
    """Copy the segment's header; None if it is gone, too small or holds no ring header.

    The segment is opened read-only and only its first 4096 bytes are mapped,
    read-only, for the time of one copy.
    """
    try:
        fd = os.open(segment.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None  # removed meanwhile, or not ours
    try:
        if os.fstat(fd).st_size < HEADER_NBYTES:
            return None
        with mmap.mmap(fd, HEADER_NBYTES, access=mmap.ACCESS_READ) as mapping:
            header = mapping[:HEADER_NBYTES]
    finally:
        os.close(fd)
    if int(np.frombuffer(header, np.int64, count=1)[0]) != RING_MAGIC:
        return None
    return header


def judge_segments(names: Collection[str] | None = None) -> list[Verdict]:
    """Judge every run segment of this user (or those in ``names``): does its owner live?

    The owner pid is in the name and in the header; the owner counts as
    alive if either pid belongs to a live process that maps the segment or
    that started before the segment was last modified. A pid that now
    belongs to a younger process that does not map it was reused: its owner
    is dead.

    Raises
    ------
    FileNotFoundError
        If one of ``names`` is not a run segment of this user.
    """
    return [_judge(segment, read_header(segment)) for segment in find_segments(names)]


def clean_leftovers(names: Collection[str] | None = None, *,
                    dry_run: bool = False) -> list[Verdict]:
    """Remove the segments of runs whose owner is dead; never one of a live run.

    Parameters
    ----------
    names
        Only consider these segments (all of this user's if None).
    dry_run
        Only judge; remove nothing.

    Returns
    -------
    list of Verdict
        One per segment considered; ``removed`` is set for those removed.

    Raises
    ------
    FileNotFoundError
        If one of ``names`` is not a run segment of this user.
    """
    verdicts = []
    for verdict in judge_segments(names):
        if not verdict.owner_alive and not dry_run:
            # not ours in this process's resource tracker: nothing to unregister
            removed = unlink_segment(verdict.segment.name, tracked=False)
            if removed:
                logger.info("removed %s: %s", verdict.segment.name, verdict.reason)
            verdict = dataclasses.replace(verdict, removed=removed)
        verdicts.append(verdict)
    return verdicts


def snapshot_runs() -> list[RunSnapshot]:
    """Read the header of every run segment of this user (read-only, never blocking)."""
    snapshots = []
    for segment in find_segments():
        header = read_header(segment)
        taken_s = time.monotonic()
        statistics, error = None, ""
        if header is not None:
            try:
                statistics = header_statistics(header)
            except ValueError:  # a state this version does not know
                statistics = None
            error = error_text(header)
        snapshots.append(RunSnapshot(verdict=_judge(segment, header), statistics=statistics,
                                     error_text=error, taken_s=taken_s))
    return snapshots


def run_statuses(before: Sequence[RunSnapshot],
                 after: Sequence[RunSnapshot]) -> list[RunStatus]:
    """The runs of ``after`` with a valid header, with rates measured since ``before``."""
    earlier = {s.verdict.segment.name: s for s in before if s.statistics is not None}
    statuses = []
    for snap in after:
        if snap.statistics is None:
            continue
        old = earlier.get(snap.verdict.segment.name)
        rates: list[float | None] = [None, None, None]
        if old is not None and old.statistics is not None and snap.taken_s > old.taken_s:
            seconds = snap.taken_s - old.taken_s
            new_stats, old_stats = snap.statistics, old.statistics
            rates = [max(0, new - old_) / seconds for new, old_ in (
                (new_stats.written_events, old_stats.written_events),
                (new_stats.written_nbytes, old_stats.written_nbytes),
                (new_stats.written_frames, old_stats.written_frames))]
        statuses.append(RunStatus(snapshot=snap, events_per_s=rates[0],
                                  nbytes_per_s=rates[1], frames_per_s=rates[2]))
    return statuses


def _judge(segment: Segment, header: bytes | None) -> Verdict:
    header_pid = 0
    if header is not None:
        header_pid = int(np.frombuffer(header, np.int64, count=Field.OWNER_PID + 1)[-1])
    pids = [segment.name_pid] + ([header_pid] if header_pid not in (0, segment.name_pid)
                                 else [])
    reasons = []
    for pid in pids:
        alive, reason = _owns(pid, segment)
        if alive:
            return Verdict(segment=segment, header_pid=header_pid, owner_alive=True,
                           reason=reason)
        reasons.append(reason)
    return Verdict(segment=segment, header_pid=header_pid, owner_alive=False,
                   reason="; ".join(reasons))


def _owns(pid: int, segment: Segment) -> tuple[bool, str]:
    """Whether ``pid`` is a live process that can be the owner of ``segment``."""
    if pid <= 0:
        return False, f"owner pid {pid} is not a process id"
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False, f"owner pid {pid} has exited (zombie)"
        started = process.create_time()
    except psutil.NoSuchProcess:
        return False, f"owner pid {pid} is gone"
    except psutil.AccessDenied:
        # it exists and we cannot tell its age: never remove what may be live
        return True, f"owner pid {pid} exists (its start time is not readable)"
    if _maps(pid, segment.path):
        # a Writer maps its ring for the whole run: certain, whatever the clocks say
        return True, f"owner pid {pid} is alive and maps the segment"
    if started > segment.mtime + _START_TOLERANCE_S:
        return False, (f"owner pid {pid} was reused: its process started "
                       f"{started - segment.mtime:.0f} s after the segment was last written")
    return True, f"owner pid {pid} is alive"


def _maps(pid: int, path: str) -> bool:
    """Whether process ``pid`` has ``path`` mapped (False if that cannot be read)."""
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
            # each line ends with the mapped file's path, then " (deleted)" once unlinked
            return any(line.rstrip("\n").endswith((f" {path}", f" {path} (deleted)"))
                       for line in maps)
    except OSError:
        return False


def format_statuses(statuses: Sequence[RunStatus]) -> str:
    """The runs as the table ``top`` prints."""
    if not statuses:
        return "no runs of this user in /dev/shm"
    rows = [("PID", "STATE", "RING", "FRAMES", "EVENTS", "EVENTS/S", "MB/S", "QUEUE", "LAG",
             "PRODUCERS", "FILE")]
    for status in statuses:
        stats = status.statistics
        state = stats.state if status.snapshot.verdict.owner_alive else "DEAD"
        frames = str(stats.written_frames)
        if stats.total_frames is not None:
            frames += f"/{stats.total_frames}"
        rows.append((
            str(status.snapshot.verdict.segment.name_pid), state,
            f"{stats.slots_in_use}/{stats.slots} {status.ring_occupancy:.0%}", frames,
            str(stats.written_events), rate(status.events_per_s, 1.0),
            rate(status.nbytes_per_s, 1e6, ".2f"), str(stats.write_queue_size),
            str(stats.lag_frames), str(stats.producers_alive), stats.path))
    return "\n".join(table(rows, right=(3, 4, 5, 6, 7, 8, 9)))


def format_clean(verdicts: Sequence[Verdict], *, dry_run: bool) -> str:
    """What ``clean`` did (or would do), one line a segment and a summary."""
    if not verdicts:
        return "no run segments of this user in /dev/shm"
    lines, freed = [], 0
    for verdict in verdicts:
        name, size = verdict.segment.name, megabytes(verdict.segment.nbytes)
        if verdict.owner_alive:
            lines.append(f"kept         {name} ({size}): {verdict.reason}")
        elif dry_run:
            lines.append(f"would remove {name} ({size}): {verdict.reason}")
            freed += verdict.segment.nbytes
        elif verdict.removed:
            lines.append(f"removed      {name} ({size}): {verdict.reason}")
            freed += verdict.segment.nbytes
        else:
            lines.append(f"gone         {name}: removed by someone else meanwhile")
    leftovers = sum(not v.owner_alive for v in verdicts)
    verb = "would free" if dry_run else "freed"
    lines.append(f"{leftovers} leftover segment(s), {verb} {megabytes(freed)}; "
                 f"{len(verdicts) - leftovers} live run(s) kept")
    return "\n".join(lines)
