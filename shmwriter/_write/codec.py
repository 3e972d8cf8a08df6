"""Chunk codec: HDF5's Zstd and fletcher32 filters, applied outside HDF5.

HDF5 runs a dataset's filters one chunk at a time, in one thread, under its
global lock. :class:`ChunkCodec` produces the same stored bytes in any Python
thread (zstandard and numpy release the GIL), so the sink can encode many
chunks at once and hand them to HDF5 with ``write_direct_chunk``.

What HDF5 stores, found by experiment with HDF5 2.0 and hdf5plugin 4.4 (and
checked by ``tests/test_codec.py``):

- filters run in pipeline order: the Zstd filter (id 32015) compresses the
  whole chunk, edge chunks included, padded with the fill value, into one
  frame that records its content size (``ZSTD_compress`` at the level in
  ``cd_values[0]``, 3 when there is none);
- fletcher32 then appends a 4-byte little-endian checksum of those bytes;
- the checksum reads the bytes as big-endian 16-bit words and a lone last byte
  as the high byte of a word whose low byte is 0.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np
import zstandard

__all__ = ["FLETCHER32_FILTER_ID", "ZSTD_FILTER_ID", "ChunkCodec", "codec_for", "dataset_filters",
           "fletcher32"]

#: HDF5 filter id of the Zstd plugin (hdf5plugin.Zstd).
ZSTD_FILTER_ID = 32015
#: HDF5 filter id of the built-in fletcher32 checksum.
FLETCHER32_FILTER_ID = 3
#: Zstd levels the codec accepts (the plugin clamps others differently per version).
_ZSTD_LEVELS = range(1, 23)
#: Zstd level of the plugin when ``cd_values`` is empty (ZSTD_CLEVEL_DEFAULT).
_ZSTD_DEFAULT_LEVEL = 3
#: Words per row of the 2-d view that fletcher32 sums by rows and by columns.
_ROW_WORDS = 1024
#: Rows summed at once: 65536 column entries below 2**16 fit a uint32 sum.
_SEGMENT_ROWS = 65536


def fletcher32(data: bytes | bytearray | memoryview | np.ndarray[Any, Any]) -> int:
    """HDF5's Fletcher-32 checksum of ``data`` (as ``H5_checksum_fletcher32``).

    HDF5 adds big-endian 16-bit words ``w[i]`` (mod 65535) into ``s1`` and the
    running ``s1`` into ``s2``; the result is ``s2 << 16 | s1``. Rather than
    loop, this uses closed forms: ``s1 = sum(w)`` and ``s2 = sum((n - i) w[i])``
    for ``n`` words, both computed with numpy reductions.

    Parameters
    ----------
    data
        The bytes to check; arrays must be C-contiguous.

    Returns
    -------
    int
        The checksum as HDF5's fletcher32 filter computes it.
    """
    return _fletcher32(_as_bytes(data, "data"), _ROW_WORDS, _SEGMENT_ROWS)


def _as_bytes(data: bytes | bytearray | memoryview | np.ndarray[Any, Any],
              name: str) -> np.ndarray[Any, Any]:
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            raise ValueError(
                f"{name} must be C-contiguous; got an array with strides {data.strides}")
        return data.reshape(-1).view(np.uint8)
    return np.frombuffer(data, np.uint8)


def _fletcher32(raw: np.ndarray[Any, Any], row_words: int, segment_rows: int) -> int:
    # Reading the words little-endian (u) instead of big-endian (w) needs no
    # byte swap: w = 256 * u (mod 65535), since 65536 = 1 (mod 65535).
    nwords = (raw.size + 1) // 2
    body_words = raw.size // 2 // row_words * row_words
    total = weighted = 0  # sum(u[i]) and sum(i * u[i])
    for start in range(0, body_words, row_words * segment_rows):
        stop = min(start + row_words * segment_rows, body_words)
        words = raw[2 * start:2 * stop].view("<u2").reshape(-1, row_words)
        block_total, block_weighted = _block_sums(words)
        total += block_total
        weighted += block_weighted + start * block_total
    rest = raw[2 * body_words:]
    if rest.size:  # the last partial row, and an odd last byte, padded with zeros
        padded = np.zeros(row_words, "<u2")
        padded.view(np.uint8)[:rest.size] = rest
        block_total, block_weighted = _block_sums(padded.reshape(1, row_words))
        total += block_total
        weighted += block_weighted + body_words * block_total
    return _fold(total, nwords * total - weighted)


def _block_sums(words: np.ndarray[Any, Any]) -> tuple[int, int]:
    """sum(u) and sum(i * u) over a (rows, columns) block read row by row."""
    nrows, ncols = words.shape
    row_sums = np.add.reduce(words, axis=1, dtype=np.uint32).astype(np.uint64)
    col_sums = np.add.reduce(words, axis=0, dtype=np.uint32).astype(np.uint64)
    # index = row * ncols + col, so sum(index * u) splits into row and column parts
    weighted = (ncols * int(np.dot(np.arange(nrows, dtype=np.uint64), row_sums))
                + int(np.dot(np.arange(ncols, dtype=np.uint64), col_sums)))
    return int(row_sums.sum()), weighted


def _fold(total: int, running: int) -> int:
    # HDF5's end-around-carry reductions keep a non-zero sum in 1..65535, so a
    # multiple of 65535 ends up as 0xffff and only all-zero data gives 0.
    if total == 0:
        return 0
    s1 = (256 * total - 1) % 65535 + 1
    s2 = (256 * running - 1) % 65535 + 1
    return s2 << 16 | s1


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkCodec:
    """Encodes whole HDF5 chunks as the Zstd and fletcher32 filters would.

    One codec may be used from many threads at once; each thread keeps its
    own Zstd compressor.

    Parameters
    ----------
    zstd_level
        Zstd level 1 to 22, or None for no compression.
    fletcher32
        Whether to append HDF5's fletcher32 checksum.
    """

    zstd_level: int | None = None
    """Zstd level, or None for no compression."""
    fletcher32: bool = False
    """Whether a fletcher32 checksum follows the (compressed) bytes."""
    _local: threading.local = field(default_factory=threading.local, init=False, repr=False,
                                    compare=False)

    def __post_init__(self) -> None:
        level = self.zstd_level
        if level is not None:
            if not isinstance(level, int) or isinstance(level, bool):
                raise TypeError(f"zstd_level must be an int or None; got {level!r}")
            if level not in _ZSTD_LEVELS:
                raise ValueError(f"zstd_level must be from 1 to 22 or None; got {level!r}")
        if not isinstance(self.fletcher32, bool):
            raise TypeError(f"fletcher32 must be a bool; got {self.fletcher32!r}")

    @classmethod
    def from_filters(cls, filters: Sequence[tuple[int, Sequence[int]]]) -> ChunkCodec | None:
        """The codec for a filter pipeline, or None if it is not supported.

        Parameters
        ----------
        filters
            ``(filter id, cd_values)`` in pipeline order. Supported are the
            empty pipeline, Zstd (id 32015, no ``cd_values`` or a level from 1
            to 22), fletcher32 (id 3), and Zstd followed by fletcher32.

        Returns
        -------
        ChunkCodec or None
            None when HDF5 must apply the filters itself.
        """
        ids = [int(filter_id) for filter_id, _ in filters]
        if ids and ids[-1] == FLETCHER32_FILTER_ID:
            ids.pop()
            with_checksum = True
        else:
            with_checksum = False
        if not ids:
            return cls(zstd_level=None, fletcher32=with_checksum)
        if ids != [ZSTD_FILTER_ID]:
            return None
        cd_values = [int(value) for value in filters[0][1]]
        level = cd_values[0] if cd_values else _ZSTD_DEFAULT_LEVEL
        if len(cd_values) > 1 or level not in _ZSTD_LEVELS:
            return None
        return cls(zstd_level=level, fletcher32=with_checksum)

    def encode(self, chunk: np.ndarray[Any, Any]) -> bytes | memoryview:
        """The bytes HDF5 would store for ``chunk``, a whole C-contiguous chunk.

        Parameters
        ----------
        chunk
            All rows of one HDF5 chunk in the dataset's dtype; an edge chunk
            padded with the fill value to the full chunk shape.

        Returns
        -------
        bytes or memoryview
            The filtered chunk, for ``DatasetID.write_direct_chunk``. Without
            any filter it is a view of ``chunk``, valid while ``chunk`` is.
        """
        body: bytes | memoryview = _as_bytes(chunk, "chunk").data
        if self.zstd_level is not None:
            body = self._compressor(self.zstd_level).compress(body)
        if not self.fletcher32:
            return body
        checksum = fletcher32(body).to_bytes(4, "little")
        return b"".join((body, checksum))

    def encode_stored(self, stored: np.ndarray[Any, Any]) -> bytes | memoryview:
        """:meth:`encode` for a chunk followed by 4 spare bytes, which take the checksum.

        Without compression nothing is copied: the result is a view of
        ``stored`` (the checksum written into its last 4 bytes).

        Parameters
        ----------
        stored
            A uint8 array: one whole chunk's bytes, then 4 bytes that may be overwritten.
        """
        body = stored[:-4]
        if self.zstd_level is not None or not self.fletcher32:
            return self.encode(body)
        stored[-4:] = np.frombuffer(fletcher32(body).to_bytes(4, "little"), np.uint8)
        return stored.data

    def _compressor(self, level: int) -> zstandard.ZstdCompressor:
        compressor: zstandard.ZstdCompressor | None = getattr(self._local, "compressor", None)
        if compressor is None:
            # content size in the frame header: the plugin sizes its output from it
            compressor = zstandard.ZstdCompressor(level=level, write_content_size=True,
                                                  write_checksum=False)
            self._local.compressor = compressor
        return compressor


def dataset_filters(dataset: h5py.Dataset) -> list[tuple[int, tuple[int, ...]]]:
    """``(filter id, cd_values)`` of ``dataset``'s filter pipeline, in order."""
    dcpl = dataset.id.get_create_plist()
    pipeline = [dcpl.get_filter(index) for index in range(dcpl.get_nfilters())]
    return [(int(code), tuple(int(v) for v in values)) for code, _flags, values, _name in pipeline]


def codec_for(dataset: h5py.Dataset) -> ChunkCodec | None:
    """The codec that reproduces ``dataset``'s filters, or None if unsupported.

    The pipeline is read back from the dataset, so whatever creation keywords
    produced it (``hdf5plugin.Zstd(clevel=5)``, ``compression=32015``, ...)
    the codec matches what HDF5 would apply.
    """
    return ChunkCodec.from_filters(dataset_filters(dataset))
