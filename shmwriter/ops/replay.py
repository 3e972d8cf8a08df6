"""Replay a recorded measurement through shmwriter: the ``replay`` command.

The input's events are grouped into frames by their ``frame`` feature (each
run of consecutive events with the same value is one frame), the frames are
dealt in shuffled order to spawned producer processes, and a
:class:`~shmwriter.Writer` puts them back in order and writes them. The
output holds the input's features event for event (same values, dtypes and
order), its root attributes, logs and tables, so replaying a file checks the
whole pipeline against real data.

Details of the copy:

- Features that fit a :class:`~shmwriter.Schema` (numbers, at most three
  dimensions per event) go through the producers. ``nevents`` travels as an
  extra feature and replaces the writer's own at the end, because in a
  filtered measurement it counts the events the frame had before filtering.
  The writer's ``nevents`` is removed if the input has none.
- Other ``/events`` datasets and groups (booleans, strings, ``contour``) are
  copied with h5py after the run, as are the tables and any log whose lines
  are not UTF-8. Logs go through the writer otherwise.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import h5py
import hdf5plugin  # noqa: F401 - registers the filters of compressed input files
import numpy as np

from .._rtdc import EVENT_COUNT_ATTR
from .._spec import Feature, Schema
from ..producer import Producer
from ..writer import Writer

__all__ = ["ReplayInputError", "ReplayPlan", "ReplaySummary", "replay"]

#: Name under which the input's ``nevents`` travels through the producers.
_NEVENTS_CARRIER = "shmwriter_replay_nevents"
_READ_CACHE_NBYTES = 64 * 2**20
_RING_BUDGET_NBYTES = 64 * 2**20


class ReplayInputError(ValueError):
    """The input cannot be replayed (not an .rtdc file, no events, no ``frame`` feature)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplayPlan:
    """What a replay of one input file does; see :meth:`from_file`."""

    path: str
    """The input file."""
    events: int
    """Events of the input."""
    bounds: tuple[int, ...]
    """Event index where each frame starts, then the event count (len = frames + 1)."""
    schema: Schema
    """Features that go through the producers (``nevents`` under a private name)."""
    copied: tuple[str, ...]
    """``/events`` members copied with h5py after the run."""
    has_nevents: bool
    """Whether the input has ``nevents``."""
    metadata: dict[str, Any] = field(repr=False)
    """Root attributes handed to the Writer."""
    other_attrs: dict[str, Any] = field(repr=False)
    """Root attributes set after the run (keys not of the form ``section:key``)."""
    logs: dict[str, list[str]] = field(repr=False)
    """Logs handed to the Writer."""
    copied_logs: tuple[str, ...]
    """Logs copied with h5py (not UTF-8)."""

    @property
    def frames(self) -> int:
        """Frames the events are grouped into."""
        return len(self.bounds) - 1

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ReplayPlan:
        """Read the input's layout and metadata (not its event data).

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        IsADirectoryError
            If ``path`` is a directory.
        ReplayInputError
            If it is not an HDF5 file with events grouped by a ``frame`` feature.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path!r} is a directory; expected an .rtdc file")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such file: {path!r}")
        try:
            h5 = h5py.File(path, "r")
        except OSError as exc:
            raise ReplayInputError(f"{path!r} is not an HDF5 (.rtdc) file: {exc}") from None
        with h5:
            return _plan(path, h5)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplaySummary:
    """What a replay did."""

    path: str
    """The file written."""
    frames: int
    """Frames replayed."""
    events: int
    """Events written."""
    producers: int
    """Producer processes."""
    seconds: float
    """Wall time from the first producer's start to the finished file."""

    def line(self) -> str:
        """The one-line summary the ``replay`` command prints."""
        return (f"{self.events} events in {self.frames} frames replayed by {self.producers} "
                f"producer(s) in {self.seconds:.2f} s -> {self.path}")


def replay(plan: ReplayPlan | str | os.PathLike[str], path_out: str | os.PathLike[str], *,
           producers: int = 2, seed: int | None = None, mode: str = "thread",
           progress: Callable[[int, int], None] | None = None) -> ReplaySummary:
    """Write the input's events to ``path_out`` through ``producers`` spawned producers.

    Parameters
    ----------
    plan
        The input file, or its :class:`ReplayPlan`.
    path_out
        The .rtdc file to write (replaced if it exists; must not be the input).
    producers
        Producer processes; frames are dealt to them in shuffled order.
    seed
        Seed of the shuffle (None: a fresh one).
    mode
        The Writer's mode, ``"thread"`` or ``"process"``.
    progress
        Called with (frames written, frames) while the run goes on.

    Raises
    ------
    FileNotFoundError, IsADirectoryError, ReplayInputError
        For an unusable input (see :meth:`ReplayPlan.from_file`) or output path: an output
        that is a directory, in a directory that does not exist, or that is the input.
    RuntimeError
        If a producer process failed.
    """
    if not isinstance(plan, ReplayPlan):
        plan = ReplayPlan.from_file(plan)
    path_out = os.fspath(path_out)
    if isinstance(producers, bool) or not isinstance(producers, int) or producers < 1:
        raise ValueError(f"producers must be a positive int; got {producers!r}")
    if os.path.isdir(path_out):
        raise IsADirectoryError(f"the output {path_out!r} is a directory; expected the path of "
                                f"the .rtdc file to write")
    if os.path.exists(path_out) and os.path.samefile(path_out, plan.path):
        raise ReplayInputError(f"the output {path_out!r} is the input file; choose another path")
    shares = _deal(plan.frames, producers, seed)
    largest = int(np.diff(plan.bounds).max())
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with Writer(path_out, plan.schema, total_frames=plan.frames, index_feature=None,
                slot_events=max(1, min(8, largest)), memory_budget_nbytes=_ring_budget(plan),
                metadata=plan.metadata, logs=plan.logs, mode=mode) as writer:  # type: ignore[arg-type]
        workers = [ctx.Process(target=replay_frames, name=f"shmwriter-replay-{k}",
                               args=(writer.producer(), plan.path, list(plan.schema),
                                     [(i, plan.bounds[i], plan.bounds[i + 1]) for i in share]))
                   for k, share in enumerate(shares)]
        for worker in workers:
            worker.start()
        for worker in workers:
            while worker.is_alive():
                worker.join(0.2)
                if progress is not None:
                    progress(writer.written_frames, plan.frames)
        failed = [w.name for w in workers if w.exitcode != 0]
        if failed:
            raise RuntimeError(f"replay producer(s) {', '.join(failed)} failed (exit codes "
                               f"{[w.exitcode for w in workers if w.exitcode != 0]})")
    _finish_file(plan, path_out)
    if progress is not None:
        progress(plan.frames, plan.frames)
    return ReplaySummary(path=path_out, frames=plan.frames, events=writer.written_events,
                         producers=producers, seconds=time.perf_counter() - start)


def replay_frames(producer: Producer, path: str, features: Sequence[str],
                  frames: Sequence[tuple[int, int, int]]) -> None:
    """Worker: put each ``(frame, first event, stop)`` read from ``path``, then close."""
    with producer, h5py.File(path, "r", rdcc_nbytes=_READ_CACHE_NBYTES) as h5:
        events = h5["events"]
        sources = {name: events["nevents" if name == _NEVENTS_CARRIER else name]
                   for name in features}
        for frame, start, stop in frames:
            producer.put(frame, {name: ds[start:stop] for name, ds in sources.items()})


def _plan(path: str, h5: h5py.File) -> ReplayPlan:
    events = h5.get("events")
    if not isinstance(events, h5py.Group):
        raise ReplayInputError(f"{path!r} has no /events group; it is not an .rtdc file")
    frame = events.get("frame")
    if not isinstance(frame, h5py.Dataset) or frame.ndim != 1:
        raise ReplayInputError(f"{path!r} has no 'frame' feature; replay groups the events "
                               f"into frames by it")
    count = len(frame)
    if count == 0:
        raise ReplayInputError(f"{path!r} holds no events")
    values = frame[:]
    starts = np.flatnonzero(values[1:] != values[:-1]) + 1
    bounds = (0, *starts.tolist(), count)
    features: dict[str, Feature] = {}
    copied: list[str] = []
    for name, member in events.items():
        feature = _feature_of(member, count)
        if feature is None or name == _NEVENTS_CARRIER:
            copied.append(name)
        else:
            features[_NEVENTS_CARRIER if name == "nevents" else name] = feature
    metadata: dict[str, Any] = {}
    other_attrs: dict[str, Any] = {}
    for key, value in h5.attrs.items():
        if key == EVENT_COUNT_ATTR:
            continue  # the writer sets it (to the same number)
        target = metadata if key.count(":") == 1 else other_attrs
        target[key] = value
    logs, copied_logs = _read_logs(h5)
    return ReplayPlan(path=path, events=count, bounds=bounds, schema=Schema(features),
                      copied=tuple(copied), has_nevents="nevents" in events, metadata=metadata,
                      other_attrs=other_attrs, logs=logs, copied_logs=copied_logs)


def _feature_of(member: object, count: int) -> Feature | None:
    """The Feature for a dataset that can go through the producers, else None."""
    if not isinstance(member, h5py.Dataset) or member.ndim < 1 or len(member) != count:
        return None
    if member.dtype.kind == "b":
        return None  # the writer would store it as uint8 0/255: copy it instead
    try:
        return Feature(member.dtype, member.shape[1:])
    except (TypeError, ValueError):
        return None


def _read_logs(h5: h5py.File) -> tuple[dict[str, list[str]], tuple[str, ...]]:
    logs: dict[str, list[str]] = {}
    copied = []
    group = h5.get("logs")
    if not isinstance(group, h5py.Group):
        return logs, ()
    for name, member in group.items():
        try:
            lines = [_text(line) for line in member[:]]
        except (UnicodeDecodeError, TypeError, ValueError):
            lines = []
        if lines and not any("\0" in line for line in lines):
            logs[name] = lines
        else:
            copied.append(name)
    return logs, tuple(copied)


def _text(line: object) -> str:
    if isinstance(line, bytes | np.bytes_):
        return bytes(line).decode("utf-8")
    if isinstance(line, str):
        return line
    raise TypeError(f"a log line must be text; got {type(line).__name__}")


def _deal(frames: int, producers: int, seed: int | None) -> list[list[int]]:
    """All frame indices in shuffled order, dealt to the producers in turn."""
    order = np.random.default_rng(seed).permutation(frames)
    return [order[k::producers].tolist() for k in range(producers)]


def _ring_budget(plan: ReplayPlan) -> int:
    """A ring that holds the largest frame several times over, at least 64 MiB."""
    largest = int(np.diff(plan.bounds).max())
    return max(_RING_BUDGET_NBYTES, 8 * largest * plan.schema.event_nbytes)


def _finish_file(plan: ReplayPlan, path_out: str) -> None:
    """After the Writer closed: the input's nevents, the copied members, tables, other attrs."""
    with h5py.File(plan.path, "r") as src, h5py.File(path_out, "a") as dst:
        events = dst["events"]
        if "nevents" in events:
            del events["nevents"]  # the writer's own; the input's (or none) replaces it
        if plan.has_nevents:
            events.move(_NEVENTS_CARRIER, "nevents")
        for name in plan.copied:
            src.copy(src["events"][name], events, name=name)
        if plan.copied_logs:
            logs = dst.require_group("logs")
            for name in plan.copied_logs:
                if name in logs:
                    del logs[name]
                src.copy(src["logs"][name], logs, name=name)
        if "tables" in src:
            tables = dst.require_group("tables")
            for name in src["tables"]:
                src.copy(src["tables"][name], tables, name=name)
        for key, value in plan.other_attrs.items():
            dst.attrs[key] = value
