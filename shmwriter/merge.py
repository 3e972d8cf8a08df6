"""Merge: runs written apart, joined into one .rtdc file in frame order.

A run split by hand (one Writer per machine or per time span) gives one file
per part, each holding frames ``0 .. total_frames - 1`` of its own.
:func:`merge_runs` joins them in the order given: frame ``f`` of a part
becomes frame ``f`` plus the frames of the parts before it. The result is the
file one Writer would have written from the same frames: the same datasets
(chunks, filters, image attributes), the first part's metadata and logs, the
frames missing in any part as one missing-frames log, the run log and
``experiment:event count`` of the whole.

Parts written by node-local Writers (:class:`shmwriter.ray.RayWriter`, or
by hand) may share a run by blocks instead: each file's ``shmwriter-part`` log
holds its :class:`~shmwriter._blocks.BlockPlan`, block ``b`` of the run is
part ``b mod parts``'s, and the merge puts the blocks back in run order. Any
of those parts may be an aborted run's (a node lost): its frames not done are
missing.

The merge goes feature by feature. Where a part's rows lie on the merged
file's chunk boundaries as they lie on its own (the whole first part of a
sequence, say), its stored chunks are copied as they are, with
``read_direct_chunk`` and ``write_direct_chunk``: nothing is decoded or
encoded. The other rows are read, gathered into the merged file's chunks and
encoded again through the Writer's own sink (the parallel codec where the
filters allow), so memory stays at a few chunks.

The features the Writer adds are told by name and dtype: uint32 ``frame`` or
``index_unmapped`` (shifted to the merged frame indices) and ``nevents``. A
schema's own feature named so is copied as it is, unless it is uint32 too: then
it cannot be told from the Writer's and is shifted like it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import h5py
import numpy as np

from ._blocks import PART_LOG, BlockPlan
from ._ranges import FrameRanges
from ._ring.ring import State
from ._rtdc import EVENT_COUNT_ATTR, MAX_FRAME_INDEX, MISSING_FRAMES_LOG, RUN_LOG
from ._spec import Feature, Schema
from ._write.codec import FLETCHER32_FILTER_ID, dataset_filters
from ._write.columns import ChunkColumn, ColumnLayout
from ._write.gather import DERIVED_DTYPES, FRAME_INDEX_FEATURES, frame_bounds
from ._write.h5sink import EncodedChunk, H5Sink
from ._write.run import run_log_lines

__all__ = ["MergedPart", "merge_runs"]

#: Bytes of one feature read from a part before they are stored.
_SLAB_NBYTES = 32 * 2**20
#: HDF5's chunk cache for a part's datasets: a read across a chunk boundary decodes the
#: chunk before it once, not once per read.
_PART_CHUNK_CACHE_NBYTES = 8 * 2**20
#: HDF5 filter ids that h5py knows by name, with how its keywords give their option.
_SHUFFLE_FILTER_ID, _GZIP_FILTER_ID, _LZF_FILTER_ID = 2, 1, 32000
#: Filter options that a plugin puts before the user's when a dataset is created, per filter
#: id: Bitshuffle's version (2) and the type size (1). A merged dataset whose pipeline still
#: differs from its part's is refused (see _check_filters).
_SET_BY_PLUGIN = {32008: 3}


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
    missing_frames: FrameRanges
    """Its missing frames, as indices of the merged file."""
    copied_chunks: int = 0
    """Its HDF5 chunks stored in the merged file as they were, over all features: read and
    written without decoding, where its rows lie on the merged file's chunk boundaries as
    on its own (the rest is encoded again)."""


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
        If there is no part, a part is given twice or is the output, a part is not
        a closed run's file, an aborted run's part is not the last, or a part's
        features or filters differ from the first part's (the message names the part
        and the feature).

    Notes
    -----
    The merged file is written beside ``output`` under a temporary name and takes
    its name only when complete: a merge that fails leaves ``output`` as it was.
    """
    if not parts:
        raise ValueError("merge_runs needs at least one part")
    output, paths = os.fspath(output), [os.fspath(p) for p in parts]
    _check_paths(output, paths)
    infos = [read_part(path) for path in paths]
    for info in infos[1:]:
        _check_same_layout(infos[0], info)
    plan = _plan_of(infos)
    if plan is None:
        merged = _place_in_sequence(infos)
        spans = [(k, range(info.frames), merged[k].first_frame)
                 for k, info in enumerate(infos)]
    else:
        infos = sorted(infos, key=lambda info: info.part)
        merged = [_place_in_plan(info, plan) for info in infos]
        spans = [(k, frames, plan.to_run(k, frames.start)) for k, frames in plan.spans()]
    copied: list[int] = []
    _write_replacing(output, lambda path: copied.extend(_write_merged(path, infos, merged,
                                                                      spans)))
    return [replace(place, copied_chunks=count) for place, count in zip(merged, copied,
                                                                         strict=True)]


def _place_in_sequence(infos: Sequence[_Part]) -> list[MergedPart]:
    """Parts that follow one another: frame ``f`` of a part is ``f`` + the frames before."""
    for info in infos[:-1]:
        if info.run_log.get("state") != State.DONE.name:
            raise ValueError(f"part {info.path!r} is an aborted run's file; only the last "
                             f"part may be (its frames not done are missing)")
    merged, at = [], 0
    for info in infos:
        missing = FrameRanges((a + at, b + at) for a, b in info.missing.spans)
        merged.append(MergedPart(info.path, at, info.frames, info.events, missing))
        at += info.frames
    if at > MAX_FRAME_INDEX + 1:
        raise ValueError(f"the parts cover {at} frames; a file holds at most "
                         f"{MAX_FRAME_INDEX + 1}")
    return merged


def _place_in_plan(info: _Part, plan: BlockPlan) -> MergedPart:
    """A part that owns every ``plan.parts``-th block; ``first_frame`` is its first block's."""
    if info.frames != plan.part_frames(info.part):
        raise ValueError(f"part {info.path!r} covers {info.frames} frames; its block plan "
                         f"gives part {info.part} {plan.part_frames(info.part)}")
    missing = plan.to_run_ranges(info.part, info.missing.spans)
    return MergedPart(info.path, plan.block(info.part).start, info.frames, info.events,
                      missing)


def _plan_of(infos: Sequence[_Part]) -> BlockPlan | None:
    """The parts' common block plan, None if none has one; refuses a plan with a part
    missing, given twice or belonging to another plan."""
    plans = {info.plan for info in infos}
    if plans == {None}:
        return None
    if len(plans) != 1:
        raise ValueError(f"the parts were written for different block plans (or some for "
                         f"none): {sorted(str(p) for p in plans)}")
    plan = plans.pop()
    assert plan is not None
    numbers = sorted(info.part for info in infos)
    if numbers != list(range(plan.parts)):
        raise ValueError(f"a run of {plan.parts} parts needs parts 0..{plan.parts - 1} once "
                         f"each; got parts {numbers}")
    if plan.total_frames > MAX_FRAME_INDEX + 1:
        raise ValueError(f"the parts cover {plan.total_frames} frames; a file holds at most "
                         f"{MAX_FRAME_INDEX + 1}")
    return plan


def _check_paths(output: str, paths: Sequence[str]) -> None:
    """Refuse a part given twice, or one that the output names (any way: links too)."""
    seen: dict[str, str] = {}
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            raise ValueError(f"part {path!r} is given twice (as {seen[real]!r} too)")
        seen[real] = path
    if os.path.realpath(output) in seen:
        raise ValueError(f"the output {output!r} is one of the parts")


def _write_replacing(output: str, write: Callable[[str], None]) -> None:
    """``write(path)`` to a temporary file beside ``output``, then rename it to ``output``."""
    folder, name = os.path.split(os.path.abspath(output))
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".merging", dir=folder)
    os.close(fd)
    try:
        write(temporary)
        os.replace(temporary, output)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


@dataclass(frozen=True, slots=True)
class _Part:
    """What a part's file says, read before anything is written."""

    path: str
    schema: Schema
    derived: tuple[str, ...]
    kwargs: dict[str, dict[str, Any]]
    """Each feature's creation keywords, to create it again."""
    filters: dict[str, list[tuple[int, tuple[int, ...]]]]
    """Each feature's filter pipeline as HDF5 holds it."""
    metadata: dict[str, Any]
    logs: dict[str, list[str]]
    run_log: dict[str, str]
    frames: int
    events: int
    missing: FrameRanges
    plan: BlockPlan | None
    """The block plan its file records (None: a part of a sequence)."""
    part: int
    """Its number in ``plan``."""


def read_part(path: str) -> _Part:
    """What the part's file says; ValueError if a merge cannot take it."""
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:  # HDF5's message may run over lines: one line of it
        raise ValueError(f"part {path!r} cannot be opened as HDF5: "
                         f"{' '.join(str(exc).split())}") from None
    with h5:
        if "events" not in h5 or not len(h5["events"]):
            raise ValueError(f"part {path!r} has no /events datasets")
        events = h5["events"]
        derived = tuple(name for name in DERIVED_DTYPES if name in events
                        and events[name].dtype == DERIVED_DTYPES[name])
        if "nevents" not in derived:
            raise ValueError(f"part {path!r} has no uint32 'nevents' feature: not a file the "
                             f"Writer wrote")
        schema = Schema({name: Feature(d.dtype, tuple(d.shape[1:]))
                         for name, d in events.items() if name not in derived})
        kwargs = {name: _filter_kwargs(path, name, d) for name, d in events.items()}
        filters = {name: dataset_filters(d) for name, d in events.items()}
        logs = {name: [line.decode("utf-8") for line in d[:]]
                for name, d in h5.get("logs", {}).items()}
        metadata = {key: value for key, value in h5.attrs.items() if key != EVENT_COUNT_ATTR}
        lengths = {len(d) for d in events.values()}
    if len(lengths) != 1:
        raise ValueError(f"part {path!r}: its /events datasets differ in length {lengths}")
    run_log = dict(line.partition("=")[::2] for line in logs.pop(RUN_LOG, []))
    plan, part = None, 0
    if PART_LOG in logs:
        try:
            plan, part = BlockPlan.from_log(logs.pop(PART_LOG))
        except ValueError as exc:
            raise ValueError(f"part {path!r}: {exc}") from None
    frames = _frames_of(path, run_log)
    missing = FrameRanges.from_lines(logs.pop(MISSING_FRAMES_LOG, []))
    done = int(run_log.get("frames_done", frames))
    if done < frames:  # an aborted run: the frames after those done never came
        missing = missing.union([(done, frames)])
    return _Part(path, schema, derived, kwargs, filters, metadata, logs, run_log, frames,
                 lengths.pop(), missing, plan, part)


def _frames_of(path: str, run_log: Mapping[str, str]) -> int:
    """Frames a part covers, from its run log: its total, or those done if open-ended."""
    state = run_log.get("state")
    if state not in {State.DONE.name, State.ABORTED.name}:
        raise ValueError(f"part {path!r} is not the file of a closed run (its run log says "
                         f"state={state}); `shmwriter inspect` tells more")
    total = run_log.get("total_frames", "")
    try:
        return int(run_log["frames_done"] if total == "open-ended" else total)
    except (KeyError, ValueError):
        raise ValueError(f"part {path!r}: its run log gives no frame count "
                         f"(total_frames={total!r})") from None


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
        else:  # the user's options, without those the plugin puts before them itself
            kwargs.update(compression=filter_id,
                          compression_opts=values[_SET_BY_PLUGIN.get(filter_id, 0):])
    fill = np.asarray(dataset.fillvalue)
    if fill.shape == () and fill.dtype.kind in "biuf" and fill.item() != 0:
        kwargs["fillvalue"] = fill.item()
    return kwargs


def _check_same_layout(first: _Part, other: _Part) -> None:
    if other.derived != first.derived:
        raise ValueError(f"part {other.path!r} has the writer's features {other.derived}, "
                         f"{first.path!r} has {first.derived}")
    for name, feature in first.schema.items():
        if name not in other.schema:
            raise ValueError(f"part {other.path!r} lacks feature {name!r} of {first.path!r}")
        # by repr: a NaN fill value is not equal to itself
        if other.schema[name] != feature or repr(other.kwargs[name]) != repr(first.kwargs[name]):
            raise ValueError(f"part {other.path!r}: feature {name!r} is stored differently "
                             f"from {first.path!r}")
    extra = sorted(set(other.schema) - set(first.schema))
    if extra:
        raise ValueError(f"part {other.path!r} has feature {extra[0]!r}, which "
                         f"{first.path!r} lacks")


def _write_merged(output: str, infos: Sequence[_Part], merged: Sequence[MergedPart],
                  spans: Sequence[tuple[int, range, int]]) -> list[int]:
    """Copy each span ``(part, its frames, run frame of the first)`` in the order given,
    feature by feature; return how many chunks of each part were stored unchanged."""
    first = infos[0]
    sink = H5Sink(output, first.schema, first.derived, None, first.metadata,
                  feature_kwargs=first.kwargs)
    copied = [0] * len(infos)
    try:
        with contextlib.ExitStack() as stack:
            readers = [stack.enter_context(_PartReader(info)) for info in infos]
            pieces = [piece for part, frames, first_frame in spans
                      if (piece := _Piece(part, *readers[part].rows(frames),
                                          first_frame - frames.start)).stop > piece.start]
            _check_filters(first, sink)
            sink.resize(sum(piece.stop - piece.start for piece in pieces))
            for name in sink.layouts:
                copy = _FeatureCopy(sink.stored_layout(name), shifted=name in FRAME_INDEX_FEATURES
                                    and name in first.derived)
                # one h5py dataset a part, not a piece: a run of a million blocks has as many
                for batch in copy.batches([reader.events[name] for reader in readers], pieces):
                    sink.store(name, batch)
                for part, count in copy.copied.items():
                    copied[part] += count
    except BaseException:
        sink.abandon()
        raise
    missing = FrameRanges().union(span for place in merged for span in place.missing_frames.spans)
    logs = dict(first.logs)
    logs[RUN_LOG] = _run_log(infos, len(missing), None if first.plan is None
                             else first.plan.total_frames)
    sink.close(missing_frames=missing, logs=logs)
    return copied


def _check_filters(first: _Part, sink: H5Sink) -> None:
    """Refuse a merged dataset whose filter pipeline differs from the part's: a plugin
    that sets options of its own in a way the merge cannot give again."""
    for name, filters in first.filters.items():
        if sink.filters(name) != filters:
            raise ValueError(f"part {first.path!r}: feature {name!r} has the filters "
                             f"{filters}, which merge_runs cannot create again (it gets "
                             f"{sink.filters(name)})")


class _PartReader:
    """A part's file, open for finding the rows of its frames."""

    def __init__(self, info: _Part) -> None:
        self._h5 = h5py.File(info.path, "r", rdcc_nbytes=_PART_CHUNK_CACHE_NBYTES)
        #: The part's /events datasets.
        self.events: h5py.Group = self._h5["events"]
        # 4 bytes an event, read whole: a frame's events are the next nevents rows
        self._bounds = frame_bounds(self.events["nevents"][:])
        index = next((name for name in FRAME_INDEX_FEATURES if name in info.derived), None)
        if index is None and info.plan is not None:
            raise ValueError(f"part {info.path!r} has no frame index feature (index_feature "
                             f"was None): its blocks cannot be told apart")
        rows = (self.events[index][:] if index is not None
                else np.zeros(info.events, np.uint32))
        self._frames = rows[self._bounds[:-1]]  # each frame's index in the part

    def __enter__(self) -> _PartReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._h5.close()

    def rows(self, frames: range) -> tuple[int, int]:
        """The rows ``start, stop`` of the events of the part's ``frames``."""
        at = int(np.searchsorted(self._frames, frames.start, "left"))
        last = int(np.searchsorted(self._frames, frames.stop, "left"))
        return self._bounds[at], self._bounds[last]


@dataclass(frozen=True, slots=True)
class _Piece:
    """Rows of a part that follow in the merged file, and what its frame indices gain."""

    part: int
    start: int
    stop: int
    shift: int
    """Added to the frame index feature: the merged index of the part's frame 0."""


class _FeatureCopy:
    """One feature's rows from the parts, as the merged dataset's stored chunks.

    Where a piece's rows lie on the merged file's chunk boundaries as they lie
    on the part's, its whole chunks are copied as stored (no decoding, no
    encoding); the rest is read into the merged file's chunks and encoded again.
    """

    def __init__(self, layout: ColumnLayout, *, shifted: bool) -> None:
        assert layout.chunk_rows is not None
        self._layout, self._shifted = layout, shifted
        self._chunk_rows = layout.chunk_rows
        #: Rows read from a part before they are stored.
        self._read_rows = max(1, _SLAB_NBYTES // max(layout.event_nbytes, 1))
        #: Chunks stored unchanged, per part.
        self.copied: collections.Counter[int] = collections.Counter()

    def batches(self, sources: Sequence[h5py.Dataset], pieces: Sequence[_Piece],
                ) -> Iterator[Iterable[tuple[int, np.ndarray[Any, Any] | EncodedChunk]]]:
        """Batches of ``(merged row, chunk)``, the feature's stored chunks in row order;
        ``sources`` are the parts' datasets, ``pieces`` hold rows (none is empty).

        Each batch must be stored before the next is asked for: two columns take
        turns, each filled again once its chunks are in the file.
        """
        same_chunks = [source.chunks == (self._chunk_rows, *self._layout.shape)
                       for source in sources]
        filling, spare = self._column(0), self._column(0)
        for number, piece in enumerate(pieces):
            source = sources[piece.part]
            copyable = same_chunks[piece.part] and not (self._shifted and piece.shift)
            at = piece.start
            while at < piece.stop:
                merged = filling.base_row + filling.rows
                lines_up = copyable and (merged - at) % self._chunk_rows == 0
                rows = self._copyable_rows(len(source), piece, at,
                                           last=number == len(pieces) - 1) if lines_up else 0
                if rows and filling.rows:  # whole chunks gathered before: to the file first
                    yield filling.stored_chunks()
                    spare.continue_from(filling)
                    filling, spare = spare, filling
                if rows:
                    yield self._copied(source, piece.part, at, merged, rows)
                    at += rows
                    filling.rebase(merged + rows)
                    continue
                stop = self._read_stop(at, piece.stop, lines_up=lines_up)
                self._read(source, at, stop, piece.shift, filling)
                at = stop
                if filling.rows >= self._read_rows or (
                        lines_up and filling.rows % self._chunk_rows == 0):
                    yield filling.stored_chunks()[:filling.rows // self._chunk_rows]
                    spare.continue_from(filling)
                    filling, spare = spare, filling
        filling.pad()
        yield filling.stored_chunks()

    def _copyable_rows(self, source_rows: int, piece: _Piece, at: int, *, last: bool) -> int:
        """Rows from ``at`` whose stored chunks can be copied, for a piece that lines up
        and a column holding no rows: its whole chunks from a chunk boundary on, and the
        part's last, incomplete chunk too if it ends the merged file (both pad it alike)."""
        if at % self._chunk_rows:
            return 0
        if last and piece.stop == source_rows:
            return piece.stop - at
        return (piece.stop - at) // self._chunk_rows * self._chunk_rows

    def _copied(self, source: h5py.Dataset, part: int, at: int, merged: int, rows: int,
                ) -> Iterator[tuple[int, EncodedChunk]]:
        zeros = (0,) * len(self._layout.shape)
        for offset in range(0, rows, self._chunk_rows):  # the last may be an edge chunk
            filter_mask, data = source.id.read_direct_chunk((at + offset, *zeros))
            self.copied[part] += 1
            yield merged + offset, EncodedChunk(filter_mask, data)

    def _read_stop(self, at: int, stop: int, *, lines_up: bool) -> int:
        """Where the next read ends: a slab on, the piece's end, or where whole chunks can
        be copied from (the next chunk boundary, if the piece lines up)."""
        end = min(stop, at + self._read_rows)
        if lines_up and at % self._chunk_rows:
            end = min(end, at - at % self._chunk_rows + self._chunk_rows)
        return end

    def _read(self, source: h5py.Dataset, start: int, stop: int, shift: int,
              column: ChunkColumn) -> None:
        """Append the part's rows ``start .. stop`` to ``column``, read straight into it."""
        def fill(offset: int, rows: np.ndarray[Any, Any]) -> None:
            source.read_direct(rows, np.s_[start + offset:start + offset + len(rows)])
            if self._shifted and shift:
                rows += np.asarray(shift, rows.dtype)

        column.reserve(column.rows + stop - start)
        column.extend_in_place(stop - start, fill)

    def _column(self, base_row: int) -> ChunkColumn:
        return ChunkColumn(self._layout, base_row, self._read_rows + 2 * self._chunk_rows)


def _run_log(infos: Sequence[_Part], nmissing: int, total_frames: int | None) -> list[str]:
    """The run log of the whole: DONE if every part is, else ABORTED with the first reason."""
    aborted = [info for info in infos if info.run_log.get("state") != State.DONE.name]

    def total(key: str) -> int:
        return sum(int(info.run_log.get(key, 0)) for info in infos)

    planned = total_frames is not None
    if total_frames is None and infos[-1].run_log.get("total_frames") != "open-ended":
        total_frames = sum(info.frames for info in infos)
    return run_log_lines(
        state=State.ABORTED if aborted else State.DONE,
        total_frames=total_frames,
        # a plan's parts are done in blocks, not as one prefix: the missing log tells
        frames_done=total_frames if planned and total_frames is not None
        else total("frames_done"),
        written_frames=total("written_frames"), missing_frames=nmissing,
        rejected_frames=total("rejected_frames"),
        reason=aborted[0].run_log.get("reason") if aborted else None)
