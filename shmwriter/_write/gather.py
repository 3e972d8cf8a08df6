"""Gather: copy frames, in frame order, into the columns of the next chunk.

A chunk holds the events of up to ``write_threshold`` consecutive frames: per
feature one :class:`~.columns.ChunkColumn` in the file's dtype (masks arrive as
0/255), laid out as the sink stores it, plus the per-event features the writer
derives: the frame index (``frame`` or ``index_unmapped``) and ``nevents``.

Columns go back to the gatherer once their chunk is written
(:meth:`ChunkGatherer.recycle`) and serve a later chunk: their memory is
touched for the first time once, not once per chunk. Fresh pages cost about
0.5 to 0.7 s per GB to fault in and zero, four times a copy into warm memory.
For the same reason a column is made with room for ``first_room_events`` or
twice the largest chunk so far, whichever is more: the room is mapped but not
touched, so it costs no memory until rows fill it, and a chunk a little larger
than the last one does not make the column grow, which would copy its rows
into fresh pages and leave the old ones unused. A chunk's successor takes its
columns only when its first event comes, so that a chunk waiting for the
sink's queue has none yet, and the columns of the chunk written meanwhile
serve it. Returned columns are kept while at most ``column_sets`` sets exist
(the one gathered, one queued, one being written), and freed beyond that.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._spec import Schema
from .columns import ChunkColumn, ColumnLayout

__all__ = ["DERIVED_DTYPES", "FRAME_INDEX_FEATURES", "Chunk", "ChunkGatherer", "frame_bounds",
           "plain_layouts"]

#: Features of fewer bytes per event are copied with one fancy index when scattered.
_LARGE_NBYTES = 256
#: Up to this many pieces every feature is copied piece by piece.
_FEW_PIECES = 4
#: Most bytes of room a column is made with before any chunk was taken, whatever
#: ``first_room_events`` asks (room is address space, not memory, until it is used).
_FIRST_ROOM_NBYTES = 256 * 2**20

#: Per-event features the writer can derive, and their dtypes.
DERIVED_DTYPES: dict[str, np.dtype[Any]] = {
    "frame": np.dtype(np.uint32),
    "index_unmapped": np.dtype(np.uint32),
    "nevents": np.dtype(np.uint32),
}
#: The derived features that hold each event's frame index (a schema's own feature of that
#: name has the schema's dtype and is not derived).
FRAME_INDEX_FEATURES = ("frame", "index_unmapped")


def frame_bounds(nevents: np.ndarray[Any, Any]) -> list[int]:
    """The first row of each frame in a file's rows, then the number of rows: the
    ``nevents`` of a frame's first row says how many rows it has (the last frame's may
    run past the rows given, in a file cut short)."""
    bounds, row = [], 0
    while row < len(nevents):
        bounds.append(row)
        row += max(int(nevents[row]), 1)
    bounds.append(len(nevents))
    return bounds


def plain_layouts(schema: Schema, derived: Sequence[str]) -> dict[str, ColumnLayout]:
    """Plain (contiguous) column layouts of ``schema``'s features and the ``derived`` ones."""
    layouts = {name: ColumnLayout(f.shape, f.file_dtype, None) for name, f in schema.items()}
    layouts.update({name: ColumnLayout((), DERIVED_DTYPES[name], None) for name in derived})
    return layouts


@dataclass(frozen=True, slots=True)
class Chunk:
    """Events of consecutive frames, ready for the file."""

    first_frame: int
    """Index of the first frame covered."""
    nframes: int
    """Frames covered (missing ones included)."""
    nmissing: int
    """Frames covered that never arrived."""
    nevents: int
    """New events: the file grows by this many rows."""
    first_row: int
    """File row of the first new event."""
    columns: dict[str, ChunkColumn]
    """Feature name to its column, derived features included (empty without events)."""

    @property
    def nbytes(self) -> int:
        """Bytes of the new events over all features."""
        return self.nevents * sum(c.layout.event_nbytes for c in self.columns.values())

    def arrays(self) -> dict[str, np.ndarray[Any, Any]]:
        """Feature name to the new events' (nevents, *shape) values, as arrays."""
        return {name: column.values(column.carried) for name, column in self.columns.items()}


class ChunkGatherer:
    """Builds chunks from frames appended in frame order.

    Parameters
    ----------
    schema
        Features of the events.
    derived
        Names from :data:`DERIVED_DTYPES` to add to every event.
    layouts
        Each feature's column layout, derived ones included (the sink's, see
        ``H5Sink.layouts``); plain ones by default.
    column_sets
        Sets of columns (one per chunk) to keep: the one being gathered and
        those out, queued or being written. Columns that come back are kept for
        later chunks while no more sets than that exist, freed beyond. The
        gatherer never refuses a set: the caller bounds how many chunks are out
        (the Writer's sink queue holds one, one more is written).
    first_room_events
        Events a chunk's columns have room for before they grow (at most
        256 MiB of room each), or twice the largest chunk so far where that is
        more.
    """

    def __init__(self, schema: Schema, derived: tuple[str, ...],
                 layouts: Mapping[str, ColumnLayout] | None = None, *,
                 column_sets: int = 3, first_room_events: int = 64) -> None:
        self._schema, self._derived = schema, derived
        self._layouts = dict(layouts or plain_layouts(schema, derived))
        self._small = frozenset(n for n, f in schema.items() if f.event_nbytes < _LARGE_NBYTES)
        self._first_room_events = first_room_events
        self._largest_chunk = 0  # events of the largest chunk taken so far
        self._column_sets = column_sets
        self._spare: list[dict[str, ChunkColumn]] = []
        self._out = 0  # chunks with columns taken and not recycled (the sink has them)
        # take(), the first append after it and recycle() run in different threads
        self._lock = threading.Lock()
        self._file_rows = 0  # events of the chunks taken so far
        #: The columns being gathered into; None from a take() to the next event.
        self._columns: dict[str, ChunkColumn] | None = {
            name: self._new_column(name) for name in self._layouts}
        #: The last chunk's columns, whose last incomplete stored chunks the next carries.
        self._previous: dict[str, ChunkColumn] | None = None
        self.first_frame = 0
        #: Frames (missing ones included) and events gathered so far.
        self.nframes = self.nevents = self.nmissing = 0

    def append(self, frame: int, nevents: int, arrays: Mapping[str, np.ndarray[Any, Any]],
               ) -> None:
        """Append frame ``frame`` from private ``arrays`` (``nevents`` rows each).

        The arrays are in the file's dtypes already (masks as uint8 0/255).
        """
        if nevents:
            columns = self._reserve(nevents)
            for name in self._schema:
                columns[name].extend(arrays[name][:nevents])
            for name in self._derived:
                value = nevents if name == "nevents" else frame
                columns[name].extend(np.full(nevents, value, DERIVED_DTYPES[name]))
            self.nevents += nevents
        self.nframes += 1

    def append_from_ring(self, frames: Sequence[tuple[int, int, Sequence[tuple[int, int]]]],
                         ring_rows: Mapping[str, np.ndarray[Any, Any]]) -> None:
        """Append consecutive frames still in the ring, in one go.

        ``frames`` holds ``(frame, nevents, pieces)`` in frame order, where
        ``pieces`` are ``(first row, rows)`` of the frame's events in
        ``ring_rows[name]``, each feature across the whole ring as stored
        (see ``SlotRing.row_views``). Pieces that touch are copied as one (a
        packed batch in frame order is one copy per feature). Small features
        (scalars) scattered over many pieces are copied with one fancy index,
        which saves a numpy call per piece and feature.
        """
        counts = [nevents for _, nevents, _ in frames]
        runs = _merge_pieces(piece for _, _, pieces in frames for piece in pieces)
        total = sum(counts)
        self.nframes += len(frames)
        if not total:
            return
        columns = self._reserve(total)
        rows = np.concatenate([np.arange(first, first + n) for first, n in runs]) \
            if len(runs) > _FEW_PIECES else None
        for name in self._schema:
            column, source = columns[name], ring_rows[name]
            if rows is not None and name in self._small:
                column.extend(source[rows])
                continue
            for first, n in runs:
                column.extend(source[first:first + n])
        counts_array = np.asarray(counts)
        for name in self._derived:
            values = counts_array if name == "nevents" else [f for f, _, _ in frames]
            columns[name].extend(np.repeat(values, counts_array))
        self.nevents += total

    def skip(self, nframes: int) -> None:
        """Count ``nframes`` missing frames as covered by this chunk (no events)."""
        self.nframes += nframes
        self.nmissing += nframes

    def take(self) -> Chunk:
        """Hand out the gathered chunk and start the next one after it."""
        columns: dict[str, ChunkColumn] = {}
        if self.nevents:
            assert self._columns is not None
            with self._lock:
                columns, self._columns = self._columns, None
                self._previous = columns
                self._out += 1
            for column in columns.values():
                column.pad()
        chunk = Chunk(self.first_frame, self.nframes, self.nmissing, self.nevents,
                      self._file_rows, columns)
        self.first_frame += self.nframes
        self._file_rows += self.nevents
        self._largest_chunk = max(self._largest_chunk, self.nevents)
        self.nframes = self.nevents = self.nmissing = 0
        return chunk

    def recycle(self, chunk: Chunk) -> None:
        """Take back the columns of a written ``chunk`` for later chunks (any thread).

        The caller must hold no view of them any more.
        """
        if not chunk.columns:
            return
        with self._lock:
            self._out -= 1
            sets = self._out + len(self._spare) + (self._columns is not None)
            if sets < self._column_sets:
                self._spare.append(chunk.columns)

    def _gathering(self) -> dict[str, ChunkColumn]:
        """The columns to gather into: after a take(), the next chunk's, made now (a
        spare set's where there is one), carrying the last chunk's incomplete rows."""
        with self._lock:
            if self._columns is None:
                assert self._previous is not None
                spare = self._spare.pop() if self._spare else {}
                self._columns = {}
                for name, last in self._previous.items():
                    column = spare.get(name)
                    if column is None:
                        column = self._new_column(name)
                    column.continue_from(last)
                    self._columns[name] = column
                self._previous = None
            return self._columns

    def _new_column(self, name: str) -> ChunkColumn:
        """A column for ``name`` with room for the first chunk's guess or twice the
        largest chunk so far, whichever is more (a stored column also carries up to
        an HDF5 chunk's rows of the last one)."""
        layout = self._layouts[name]
        first_room = min(self._first_room_events, _FIRST_ROOM_NBYTES // layout.event_nbytes)
        room = max(first_room, 2 * self._largest_chunk)
        return ChunkColumn(layout, 0, max(room, 1) + (layout.chunk_rows or 0))

    def _reserve(self, nevents: int) -> dict[str, ChunkColumn]:
        """The columns to gather into, with room for ``nevents`` more events in each."""
        columns = self._gathering()
        for column in columns.values():
            column.reserve(column.rows + nevents)
        return columns


def _merge_pieces(pieces: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(first row, rows)`` pieces, in order, with each piece that starts where the one
    before ends joined to it; empty pieces dropped."""
    merged: list[tuple[int, int]] = []
    for first, n in pieces:
        if not n:
            continue
        if merged and merged[-1][0] + merged[-1][1] == first:
            merged[-1] = (merged[-1][0], merged[-1][1] + n)
        else:
            merged.append((first, n))
    return merged
