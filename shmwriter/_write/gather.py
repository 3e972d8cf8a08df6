"""Gather: copy frames, in frame order, into the arrays of the next chunk.

A chunk holds the events of up to ``write_threshold`` consecutive frames, one
contiguous array per feature in the file's dtype (masks arrive as 0/255), plus
the per-event features the writer derives: the frame index (``frame`` or
``index_unmapped``) and ``nevents``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._spec import Schema

__all__ = ["DERIVED_DTYPES", "Chunk", "ChunkGatherer"]

#: Features of fewer bytes per event are copied with one fancy index when scattered.
_LARGE_NBYTES = 256
#: Up to this many pieces every feature is copied piece by piece.
_FEW_PIECES = 4

#: Per-event features the writer can derive, and their dtypes.
DERIVED_DTYPES: dict[str, np.dtype[Any]] = {
    "frame": np.dtype(np.uint32),
    "index_unmapped": np.dtype(np.uint32),
    "nevents": np.dtype(np.uint32),
}


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
    """Events, the length of every array."""
    arrays: dict[str, np.ndarray[Any, Any]]
    """Feature name to (nevents, *shape) array, derived features included."""

    @property
    def nbytes(self) -> int:
        """Bytes of all arrays."""
        return sum(a.nbytes for a in self.arrays.values())


class ChunkGatherer:
    """Builds chunks from frames appended in frame order.

    Parameters
    ----------
    schema
        Features of the events.
    derived
        Names from :data:`DERIVED_DTYPES` to add to every event.
    """

    def __init__(self, schema: Schema, derived: tuple[str, ...]) -> None:
        self._schema, self._derived = schema, derived
        self._small = frozenset(n for n, f in schema.items() if f.event_nbytes < _LARGE_NBYTES)
        self._capacity = 0
        self._capacity_hint = 64  # events of the largest chunk so far
        self._arrays: dict[str, np.ndarray[Any, Any]] = {}
        self.first_frame = 0
        #: Frames (missing ones included) and events gathered so far.
        self.nframes = self.nevents = self.nmissing = 0

    def append(self, frame: int, nevents: int, arrays: Mapping[str, np.ndarray[Any, Any]],
               ) -> None:
        """Append frame ``frame`` from private ``arrays`` (``nevents`` rows each).

        The arrays are in the file's dtypes already (masks as uint8 0/255).
        """
        if nevents:
            self._reserve(self.nevents + nevents)
            start, stop = self.nevents, self.nevents + nevents
            for name in self._schema:
                self._arrays[name][start:stop] = arrays[name][:nevents]
            for name in self._derived:
                self._arrays[name][start:stop] = nevents if name == "nevents" else frame
            self.nevents = stop
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
        self._reserve(self.nevents + total)
        start, stop = self.nevents, self.nevents + total
        rows = np.concatenate([np.arange(first, first + n) for first, n in runs]) \
            if len(runs) > _FEW_PIECES else None
        for name in self._schema:
            dest, source = self._arrays[name], ring_rows[name]
            if rows is not None and name in self._small:
                dest[start:stop] = source[rows]
                continue
            at = start
            for first, n in runs:
                dest[at:at + n] = source[first:first + n]
                at += n
        counts_array = np.asarray(counts)
        for name in self._derived:
            values = counts_array if name == "nevents" else [f for f, _, _ in frames]
            self._arrays[name][start:stop] = np.repeat(values, counts_array)
        self.nevents = stop

    def skip(self, nframes: int) -> None:
        """Count ``nframes`` missing frames as covered by this chunk (no events)."""
        self.nframes += nframes
        self.nmissing += nframes

    def take(self) -> Chunk:
        """Hand out the gathered chunk and start the next one after it."""
        arrays = {name: a[:self.nevents] for name, a in self._arrays.items()}
        chunk = Chunk(self.first_frame, self.nframes, self.nmissing, self.nevents, arrays)
        self.first_frame += self.nframes
        self._capacity_hint = max(self._capacity_hint, self.nevents)
        self.nframes = self.nevents = self.nmissing = 0
        self._arrays, self._capacity = {}, 0  # the sink owns the old arrays now
        return chunk

    def _reserve(self, nevents: int) -> None:
        if nevents <= self._capacity:
            return
        capacity = max(nevents, 2 * self._capacity, self._capacity_hint)
        grown = {}
        for name, feature in self._schema.items():
            grown[name] = np.empty((capacity, *feature.shape), feature.file_dtype)
        for name in self._derived:
            grown[name] = np.empty(capacity, DERIVED_DTYPES[name])
        for name, old in self._arrays.items():
            grown[name][:self.nevents] = old[:self.nevents]
        self._arrays, self._capacity = grown, capacity


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
