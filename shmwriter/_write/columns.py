"""Columns: one feature's rows of a chunk, laid out in memory the way HDF5 stores them.

The gatherer copies events into :class:`ChunkColumn` buffers, and the sink
hands those buffers to HDF5 as they are. A column whose dataset the sink
encodes itself (``write_direct_chunk``) is *stored*: its rows start at an HDF5
chunk boundary of the dataset, each HDF5 chunk's rows lie together, and after
each chunk a few spare bytes take the fletcher32 checksum. So the sink needs
no copy before the checksum, and none to append it. A column whose filters
HDF5 applies is *plain*: one C-contiguous array for ``Dataset.write_direct``.

A stored column starts with the rows of the dataset's last, incomplete chunk
that the file already holds (``carried``), because that chunk is stored again,
whole, with the new rows.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ChunkColumn", "ColumnLayout"]

#: Spare bytes after each stored chunk: the 4 of the checksum, rounded so that
#: every chunk starts 64-byte aligned (copies into and out of it stay fast).
_ALIGN = 64
_CHECKSUM_NBYTES = 4


@dataclass(frozen=True, slots=True)
class ColumnLayout:
    """How one feature's rows are laid out in a chunk's memory."""

    shape: tuple[int, ...]
    """Shape of one event's value."""
    dtype: np.dtype[Any]
    """The dataset's dtype."""
    chunk_rows: int | None
    """Rows per HDF5 chunk of a stored column; None for a plain one."""
    fill: Any = 0
    """The dataset's fill value: rows of a stored chunk past the last event hold it."""

    @property
    def event_nbytes(self) -> int:
        """Bytes of one event's value."""
        return self.dtype.itemsize * int(np.prod(self.shape))


def _anonymous_bytes(nbytes: int) -> np.ndarray[Any, Any]:
    """``nbytes`` of private memory mapped for this buffer alone (uint8).

    Not from the heap: a column of a chunk is megabytes, allocated and freed as
    chunks come and go, and heap blocks of that size fragment and stay with the
    process; a mapping of its own goes back to the system when the column goes.
    Private, not shared (mmap's default): its pages fault in faster, and no
    other process ever maps a column. Pages are allocated as rows touch them.
    """
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1), flags=flags), np.uint8)[:nbytes]


class ChunkColumn:
    """One feature's rows, from file row :attr:`base_row` on, in its layout.

    Parameters
    ----------
    layout
        The feature's layout.
    base_row
        File row of the column's first row (a chunk boundary when stored).
    capacity
        Rows to make room for at first.
    """

    def __init__(self, layout: ColumnLayout, base_row: int, capacity: int) -> None:
        self.layout = layout
        self.base_row = base_row
        #: Rows held, from the column's first (carried ones included).
        self.rows = 0
        #: Rows at the start that the file holds already (stored columns only).
        self.carried = 0
        self._raw = np.empty(0, np.uint8)
        self._chunks = self._view(self._raw, 0)
        self.capacity = 0
        self.reserve(capacity)

    @property
    def stored(self) -> bool:
        """Whether the sink stores this column's chunks itself."""
        return self.layout.chunk_rows is not None

    def rebase(self, base_row: int) -> None:
        """Start over, empty, at file row ``base_row`` (for a column used again)."""
        self.base_row, self.rows, self.carried = base_row, 0, 0

    def reserve(self, rows: int) -> None:
        """Make room for ``rows`` rows, keeping those held."""
        if rows <= self.capacity:
            return
        chunk_rows = self.layout.chunk_rows or 1
        nchunks = -(-max(rows, 2 * self.capacity) // chunk_rows)
        raw = _anonymous_bytes(nchunks * self._stride)
        used = self._nchunks_used() * self._stride if self.stored else (
            self.rows * self.layout.event_nbytes)
        raw[:used] = self._raw[:used]
        self._raw, self._chunks = raw, self._view(raw, nchunks)
        self.capacity = nchunks * chunk_rows

    def assign(self, at: int, values: np.ndarray[Any, Any]) -> None:
        """Set rows ``at .. at + len(values)`` (within the capacity) to ``values``."""
        for offset, rows in self.segments(at, len(values)):
            rows[...] = values[offset:offset + len(rows)]

    def segments(self, at: int, count: int) -> list[tuple[int, np.ndarray[Any, Any]]]:
        """Rows ``at .. at + count`` (within the capacity) as writable, C-contiguous views,
        one per stored chunk they touch (one for a plain column), each with its first
        row's offset from ``at``."""
        chunk_rows = self.layout.chunk_rows
        if chunk_rows is None:
            return [(0, self._chunks[at:at + count])]
        segments, done = [], 0
        chunk, row = divmod(at, chunk_rows)
        while done < count:
            step = min(chunk_rows - row, count - done)
            segments.append((done, self._chunks[chunk, row:row + step]))
            done += step
            chunk, row = chunk + 1, 0
        return segments

    def extend(self, values: np.ndarray[Any, Any]) -> None:
        """Append ``values`` as the next rows (room reserved already)."""
        self.assign(self.rows, values)
        self.rows += len(values)

    def extend_in_place(self, count: int,
                        fill: Callable[[int, np.ndarray[Any, Any]], None]) -> None:
        """Append ``count`` rows (room reserved already) that ``fill(offset, rows)`` writes
        into the column's memory, segment by segment (see :meth:`segments`)."""
        for offset, rows in self.segments(self.rows, count):
            fill(offset, rows)
        self.rows += count

    def continue_from(self, previous: ChunkColumn) -> None:
        """Start over where ``previous`` ends: from the row after its whole stored chunks,
        holding the rows of its last, incomplete chunk (which the file stores again,
        whole, with the rows that follow) as carried ones.

        ``previous`` may be this column itself, come back from the sink before the
        next chunk began: those rows move to its front.
        """
        end, chunk_rows = previous.base_row + previous.rows, self.layout.chunk_rows
        if chunk_rows is None:
            self.rebase(end)
            return
        carried = previous.rows % chunk_rows
        last = previous._nchunks_used() - 1
        if carried and (previous is not self or last):
            self._chunks[0, :carried] = previous._chunks[last, :carried]
        self.base_row, self.rows, self.carried = end - carried, carried, carried

    def pad(self) -> None:
        """Fill the rows of the last stored chunk past the last row with the fill value."""
        chunk_rows = self.layout.chunk_rows
        if chunk_rows is not None and self.rows % chunk_rows:
            self._chunks[self.rows // chunk_rows, self.rows % chunk_rows:] = self.layout.fill

    def values(self, start: int = 0, stop: int | None = None) -> np.ndarray[Any, Any]:
        """Rows ``start .. stop`` (default: all held) as one C-contiguous array.

        A view for a plain column; a copy for a stored column.
        """
        stop = self.rows if stop is None else stop
        if self.layout.chunk_rows is None:
            return self._chunks[start:stop]
        shape = (-1, *self.layout.shape)
        rows = self._chunks[:self._nchunks_used()].reshape(shape)  # a copy: chunks are apart
        return np.ascontiguousarray(rows[start:stop])

    def stored_chunks(self) -> list[tuple[int, np.ndarray[Any, Any]]]:
        """``(file row, bytes)`` of each stored chunk held, in order.

        The bytes (uint8) are the chunk, then 4 spare bytes for its checksum.
        """
        chunk_rows, nbytes = self.layout.chunk_rows, self._chunk_nbytes
        assert chunk_rows is not None, "a plain column has no stored chunks"
        return [(self.base_row + k * chunk_rows,
                 self._raw[k * self._stride:k * self._stride + nbytes + _CHECKSUM_NBYTES])
                for k in range(self._nchunks_used())]

    @property
    def _chunk_nbytes(self) -> int:
        return (self.layout.chunk_rows or 1) * self.layout.event_nbytes

    @property
    def _stride(self) -> int:
        if self.layout.chunk_rows is None:
            return self.layout.event_nbytes
        return -(-(self._chunk_nbytes + _CHECKSUM_NBYTES) // _ALIGN) * _ALIGN

    def _nchunks_used(self) -> int:
        return -(-self.rows // (self.layout.chunk_rows or 1))

    def _view(self, raw: np.ndarray[Any, Any], nchunks: int) -> np.ndarray[Any, Any]:
        """``raw`` as rows: (nchunks, chunk_rows, *shape) when stored, (rows, *shape) if not."""
        layout = self.layout
        if layout.chunk_rows is None:
            return raw.view(layout.dtype).reshape(-1, *layout.shape)
        item = layout.dtype.itemsize
        inner = [item * int(np.prod(layout.shape[i + 1:])) for i in range(len(layout.shape))]
        return np.lib.stride_tricks.as_strided(
            raw.view(layout.dtype),
            shape=(nchunks, layout.chunk_rows, *layout.shape),
            strides=(self._stride, layout.event_nbytes, *inner), writeable=True)

    def __repr__(self) -> str:
        kind = "stored" if self.stored else "plain"
        return (f"<ChunkColumn {kind} from row {self.base_row}: {self.rows} rows "
                f"({self.carried} carried) of {self.capacity}>")
