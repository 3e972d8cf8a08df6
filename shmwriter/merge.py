"""Merge: runs written apart, joined into one .rtdc file in frame order.

A run split by hand (one Writer per machine or per time span) gives one file
per part, each holding frames ``0 .. total_frames - 1`` of its own.
:func:`merge_runs` joins them in the order given: frame ``f`` of a part
becomes frame ``f`` plus the frames of the parts before it. The result is the
file one Writer would have written from the same frames: the same datasets
(chunks, filters, image attributes), the first part's metadata and logs, the
frames missing in any part as one missing-frames log, the run log and
``experiment:event count`` of the whole.

The events are re-encoded through the Writer's own sink (the parallel codec
where the filters allow), part by part, so memory stays at a few chunks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from ._ranges import FrameRanges
from ._ring.ring import State
from ._rtdc import EVENT_COUNT_ATTR, MAX_FRAME_INDEX, MISSING_FRAMES_LOG, RUN_LOG
from ._spec import Feature, Schema
from ._write.codec import FLETCHER32_FILTER_ID, dataset_filters
from ._write.gather import DERIVED_DTYPES, ChunkGatherer
from ._write.h5sink import H5Sink
from ._write.run import run_log_lines

__all__ = ["MergedPart", "merge_runs"]

#: Features that hold each event's frame index (the writer derives them), in order of
#: preference for telling which events belong to which frame.
_FRAME_FEATURES = ("frame", "index_unmapped")
#: Bytes of events read from a part at a time.
_SLAB_NBYTES = 64 * 2**20
#: HDF5 filter ids that h5py knows by name, with how its keywords give their option.
_SHUFFLE_FILTER_ID, _GZIP_FILTER_ID, _LZF_FILTER_ID = 2, 1, 32000


@dataclass(frozen=True, slots=True)
class MergedPart:
    """One part of a merged run: where its frames went."""

    path: str
    """The part's file."""
    first_frame: int
    """The merged file's index of the part's frame 0."""
    frames: int
    """Frames the part covers (its run's ``total_frames``)."""
    events: int
    """Events it holds."""
    missing_frames: tuple[int, ...]
    """Its missing frames, as indices of the merged file."""


def merge_runs(output: str | os.PathLike[str], parts: Sequence[str | os.PathLike[str]],
               ) -> list[MergedPart]:
    """Join the files of a run written in parts into ``output``, in the order given.

    Parameters
    ----------
    output
        The merged file to create (an existing one is replaced).
    parts
        The parts' .rtdc files, each written by a Writer that closed (its run
        log says how many frames it covered), with the same features and filters.

    Returns
    -------
    list of MergedPart
        Each part's place in the merged file.

    Raises
    ------
    ValueError
        If there is no part, a part is not a closed run's file, or its features or
        filters differ from the first part's (the message names the part and feature).
    """
    if not parts:
        raise ValueError("merge_runs needs at least one part")
    paths = [os.fspath(p) for p in parts]
    if os.fspath(output) in paths:
        raise ValueError(f"the output {os.fspath(output)!r} is one of the parts")
    infos = [_read_part(path) for path in paths]
    first = infos[0]
    for info in infos[1:]:
        _check_same_layout(first, info)
    merged, at = [], 0
    for info in infos:
        merged.append(MergedPart(info.path, at, info.frames, info.events,
                                 tuple(f + at for f in info.missing)))
        at += info.frames
    if at > MAX_FRAME_INDEX + 1:
        raise ValueError(f"the parts cover {at} frames; a file holds at most "
                         f"{MAX_FRAME_INDEX + 1}")
    _write_merged(os.fspath(output), first, infos, merged)
    return merged


@dataclass(frozen=True, slots=True)
class _Part:
    """What a part's file says, read before anything is written."""

    path: str
    schema: Schema
    derived: tuple[str, ...]
    kwargs: dict[str, dict[str, Any]]
    metadata: dict[str, Any]
    logs: dict[str, list[str]]
    run_log: dict[str, str]
    frames: int
    events: int
    missing: FrameRanges


def _read_part(path: str) -> _Part:
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"part {path!r} cannot be opened as HDF5: {exc}") from None
    with h5:
        if "events" not in h5 or not len(h5["events"]):
            raise ValueError(f"part {path!r} has no /events datasets")
        events = h5["events"]
        derived = tuple(name for name in DERIVED_DTYPES if name in events)
        schema = Schema({name: Feature(d.dtype, tuple(d.shape[1:]))
                         for name, d in events.items() if name not in derived})
        if not any(name in derived for name in _FRAME_FEATURES):
            raise ValueError(f"part {path!r} has no frame index feature "
                             f"({' or '.join(_FRAME_FEATURES)}) to place its events by")
        kwargs = {name: _filter_kwargs(path, name, d) for name, d in events.items()}
        logs = {name: [line.decode("utf-8") for line in d[:]]
                for name, d in h5.get("logs", {}).items()}
        metadata = {key: value for key, value in h5.attrs.items() if key != EVENT_COUNT_ATTR}
        lengths = {len(d) for d in events.values()}
    if len(lengths) != 1:
        raise ValueError(f"part {path!r}: its /events datasets differ in length {lengths}")
    run_log = dict(line.partition("=")[::2] for line in logs.pop(RUN_LOG, []))
    frames = _frames_of(path, run_log)
    missing = FrameRanges.from_lines(logs.pop(MISSING_FRAMES_LOG, []))
    return _Part(path, schema, derived, kwargs, metadata, logs, run_log, frames, lengths.pop(),
                 missing)


def _frames_of(path: str, run_log: Mapping[str, str]) -> int:
    """Frames a part covers, from its run log: its total, or those done if open-ended."""
    state = run_log.get("state")
    if state not in {State.DONE.name, State.ABORTED.name}:
        raise ValueError(f"part {path!r} is not the file of a closed run (its run log says "
                         f"state={state}); `shmwriter inspect` tells more")
    total = run_log.get("total_frames", "")
    return int(run_log["frames_done"] if total == "open-ended" else total)


def _filter_kwargs(path: str, name: str, dataset: h5py.Dataset) -> dict[str, Any]:
    """The creation keywords that give ``dataset``'s filter pipeline again."""
    kwargs: dict[str, Any] = {"compression": None, "fletcher32": False}
    for filter_id, values in dataset_filters(dataset):
        if filter_id == FLETCHER32_FILTER_ID:
            kwargs["fletcher32"] = True
        elif filter_id == _SHUFFLE_FILTER_ID:
            kwargs["shuffle"] = True
        elif kwargs["compression"] is not None:
            raise ValueError(f"part {path!r}: feature {name!r} has two compression filters; "
                             f"merge_runs reproduces one")
        elif filter_id == _GZIP_FILTER_ID:
            kwargs.update(compression="gzip", compression_opts=values[0] if values else 4)
        elif filter_id == _LZF_FILTER_ID:
            kwargs["compression"] = "lzf"
        else:
            kwargs.update(compression=filter_id, compression_opts=values)
    if dataset.fillvalue != 0:
        kwargs["fillvalue"] = dataset.fillvalue
    return kwargs


def _check_same_layout(first: _Part, other: _Part) -> None:
    if other.derived != first.derived:
        raise ValueError(f"part {other.path!r} has the writer's features {other.derived}, "
                         f"{first.path!r} has {first.derived}")
    for name, feature in first.schema.items():
        if name not in other.schema:
            raise ValueError(f"part {other.path!r} lacks feature {name!r} of {first.path!r}")
        if other.schema[name] != feature or other.kwargs[name] != first.kwargs[name]:
            raise ValueError(f"part {other.path!r}: feature {name!r} is stored differently "
                             f"from {first.path!r}")
    extra = sorted(set(other.schema) - set(first.schema))
    if extra:
        raise ValueError(f"part {other.path!r} has feature {extra[0]!r}, which "
                         f"{first.path!r} lacks")


def _write_merged(output: str, first: _Part, infos: Sequence[_Part],
                  merged: Sequence[MergedPart]) -> None:
    kwargs = _common_kwargs(first)
    sink = H5Sink(output, first.schema, first.derived, kwargs, first.metadata)
    try:
        gatherer = ChunkGatherer(first.schema, first.derived, sink.layouts)
        for info, place in zip(infos, merged, strict=True):
            _copy_events(info, place.first_frame, gatherer, sink)
    except BaseException:
        sink.abandon()
        raise
    missing = FrameRanges()
    for place in merged:
        for start, stop in FrameRanges.of(place.missing_frames).spans:
            missing.add(start, stop)
    logs = dict(first.logs)
    logs[RUN_LOG] = _run_log(infos, len(missing))
    sink.close(missing_frames=missing, logs=logs)


def _common_kwargs(first: _Part) -> dict[str, Any]:
    """The one set of creation keywords the sink takes (every feature of a part has it)."""
    kinds = {repr(sorted(k.items())) for k in first.kwargs.values()}
    if len(kinds) != 1:
        raise ValueError(f"part {first.path!r}: its features have different filters; "
                         f"merge_runs writes one setting for all")
    return next(iter(first.kwargs.values()))


def _copy_events(info: _Part, offset: int, gatherer: ChunkGatherer, sink: H5Sink) -> None:
    """Append every event of ``info``, frame by frame, its frame indices shifted by
    ``offset`` (the gatherer derives the frame features and ``nevents`` again)."""
    rows = max(1, _SLAB_NBYTES // max(info.schema.event_nbytes, 1))
    index = next(name for name in _FRAME_FEATURES if name in info.derived)
    with h5py.File(info.path, "r") as h5:
        events = h5["events"]
        frames = events[index][:]  # 4 bytes an event: read whole, to cut slabs between frames
        firsts = np.flatnonzero(np.r_[True, frames[1:] != frames[:-1]]) if len(frames) else \
            np.empty(0, np.intp)
        bounds = [*firsts.tolist(), len(frames)]
        at = 0  # index into bounds of the slab's first frame
        while at < len(bounds) - 1:
            # whole frames, about a slab's rows (a frame larger than a slab alone)
            end = max(at + 1, int(np.searchsorted(bounds, bounds[at] + rows, "right")) - 1)
            start, stop = bounds[at], bounds[end]
            arrays = {name: events[name][start:stop] for name in info.schema}
            for first, last in zip(bounds[at:end], bounds[at + 1:end + 1], strict=True):
                gatherer.append(int(frames[first]) + offset, last - first,
                                {name: a[first - start:last - start]
                                 for name, a in arrays.items()})
            chunk = gatherer.take()
            sink.write(chunk)
            gatherer.recycle(chunk)
            at = end


def _run_log(infos: Sequence[_Part], nmissing: int) -> list[str]:
    """The run log of the whole: DONE if every part is, else ABORTED with the first reason."""
    aborted = [info for info in infos if info.run_log.get("state") != State.DONE.name]

    def total(key: str) -> int:
        return sum(int(info.run_log.get(key, 0)) for info in infos)

    return run_log_lines(
        state=State.ABORTED if aborted else State.DONE,
        total_frames=sum(info.frames for info in infos), frames_done=total("frames_done"),
        written_frames=total("written_frames"), missing_frames=nmissing,
        rejected_frames=total("rejected_frames"),
        reason=aborted[0].run_log.get("reason") if aborted else None)
