"""Gather: copy frames, in frame order, into the arrays of the next chunk.

A chunk holds the events of up to ``write_threshold`` consecutive frames, one
contiguous array per feature in the file's dtype (masks arrive as 0/255), plus
the per-event features the writer derives: the frame index (``frame`` or
``index_unmapped``) and ``nevents``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._spec import Schema

__all__ = ["DERIVED_DTYPES", "Chunk", "ChunkGatherer"]

#: Features of at least this many bytes per event are copied slot by slot.
_LARGE_NBYTES = 256

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
        self._small = [n for n, f in schema.items() if f.event_nbytes < _LARGE_NBYTES]
        self._large = [n for n, f in schema.items() if f.event_nbytes >= _LARGE_NBYTES]
        self._capacity = 0
        self._capacity_hint = 64  # events of the largest chunk so far
        self._arrays: dict[str, np.ndarray[Any, Any]] = {}
        self.first_frame = 0
        #: Frames (missing ones included) and events gathered so far.
        self.nframes = self.nevents = self.nmissing = 0

    def append(self, frame: int, nevents: int,
               parts: list[tuple[Mapping[str, np.ndarray[Any, Any]], int]]) -> None:
        """Append frame ``frame``: ``parts`` are (feature arrays, events) pieces in order.

        The arrays are in the file's dtypes already (masks as uint8 0/255).
        """
        if nevents:
            self._reserve(self.nevents + nevents)
            start = self.nevents
            for source, count in parts:
                for name in self._schema:
                    self._arrays[name][start:start + count] = source[name][:count]
                start += count
            for name in self._derived:
                value = nevents if name == "nevents" else frame
                self._arrays[name][self.nevents:self.nevents + nevents] = value
            self.nevents += nevents
        self.nframes += 1

    def append_from_ring(self, frames: list[tuple[int, int, list[int]]],
                         ring_views: Mapping[str, np.ndarray[Any, Any]]) -> None:
        """Append consecutive frames still in ring slots, in one go.

        ``frames`` holds ``(frame, nevents, slots)`` in frame order and
        ``ring_views[name]`` is the feature across the ring, shaped
        ``(slots, slot_events, *shape)`` (see ``SlotRing.feature_views``). Large
        features are copied slot by slot; small ones (scalars) with one fancy
        index per batch, which saves a numpy call per feature and frame.
        """
        per_slot = next(iter(ring_views.values())).shape[1]
        slot_index: list[int] = []
        row_index: list[int] = []
        counts: list[int] = []
        parts: list[tuple[int, int]] = []
        for _frame, nevents, slots in frames:
            counts.append(nevents)
            for j, slot in enumerate(slots):
                count = min(per_slot, nevents - j * per_slot)
                slot_index.extend([slot] * count)
                row_index.extend(range(count))
                parts.append((slot, count))
        total = sum(counts)
        self.nframes += len(frames)
        if not total:
            return
        self._reserve(self.nevents + total)
        start, stop = self.nevents, self.nevents + total
        for name in self._small:
            self._arrays[name][start:stop] = ring_views[name][np.asarray(slot_index),
                                                              np.asarray(row_index)]
        for name in self._large:
            dest, source, at = self._arrays[name], ring_views[name], start
            for slot, count in parts:
                dest[at:at + count] = source[slot, :count]
                at += count
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
