"""ChunkCodec and fletcher32 against HDF5's own filters (chunks h5py wrote)."""

from __future__ import annotations

import h5py
import hdf5plugin
import numpy as np
import pytest
import zstandard

from shmwriter._write.codec import ChunkCodec, _fletcher32, codec_for, dataset_filters, fletcher32
from shmwriter._write.h5sink import dataset_kwargs


def reference_fletcher32(data: bytes) -> int:
    """HDF5's H5_checksum_fletcher32 step by step: 360-word blocks, 32-bit folds."""
    sum1 = sum2 = 0
    words = len(data) // 2
    pos = 0
    while words:
        block = min(words, 360)
        words -= block
        for _ in range(block):
            sum1 += data[pos] << 8 | data[pos + 1]
            sum2 += sum1
            pos += 2
        sum1 = (sum1 & 0xFFFF) + (sum1 >> 16)
        sum2 = (sum2 & 0xFFFF) + (sum2 >> 16)
    if len(data) % 2:
        sum1 += data[pos] << 8
        sum2 += sum1
        sum1 = (sum1 & 0xFFFF) + (sum1 >> 16)
        sum2 = (sum2 & 0xFFFF) + (sum2 >> 16)
    sum1 = (sum1 & 0xFFFF) + (sum1 >> 16)
    sum2 = (sum2 & 0xFFFF) + (sum2 >> 16)
    assert sum1 <= 0xFFFF and sum2 <= 0xFFFF
    return sum2 << 16 | sum1


RNG = np.random.default_rng(20260101)

#: name -> (data, chunk rows); the dataset holds all rows, its last chunk may be partial.
EDGE_CASES = {
    "zeros": (np.zeros((40, 30), np.uint8), 20),
    "all_ff": (np.full((40, 30), 0xFF, np.uint8), 20),
    "odd_row_uint8": (RNG.integers(0, 256, (45, 7, 13), dtype=np.uint8), 15),  # 1365 B chunks
    "odd_row_ff": (np.full((9, 41, 41), 0xFF, np.uint8), 3),
    "random_uint8": (RNG.integers(0, 256, (64, 1000), dtype=np.uint8), 32),
    "float64": (RNG.normal(size=3000), 1000),
    "bool_as_uint8": ((RNG.random((30, 80, 25)) < 0.3).astype(np.uint8) * np.uint8(255), 10),
    "last_partial_chunk": (RNG.integers(0, 256, (23, 11), dtype=np.uint8), 10),  # 3 rows
    "partial_odd_float": (RNG.normal(size=(5, 3)), 4),
    "large_ff": (np.full((2, 700_001), 0xFF, np.uint8), 2),  # sums that wrap many times
}

FILTERS = {
    "fletcher32": {"fletcher32": True},
    "zstd5+fletcher32": {**hdf5plugin.Zstd(clevel=5), "fletcher32": True},
    "zstd5": {**hdf5plugin.Zstd(clevel=5)},
    "none": {},
    "zstd_default+fletcher32": {**hdf5plugin.Zstd(), "fletcher32": True},
    "zstd1+fletcher32": {**hdf5plugin.Zstd(clevel=1), "fletcher32": True},
}


def padded_chunks(data: np.ndarray, rows: int, fill: int = 0) -> list[np.ndarray]:
    """The chunks HDF5 stores for ``data``: the last one padded to ``rows`` rows."""
    chunks = []
    for start in range(0, len(data), rows):
        chunk = np.full((rows, *data.shape[1:]), fill, data.dtype)
        part = data[start:start + rows]
        chunk[:len(part)] = part
        chunks.append(chunk)
    return chunks


def hdf5_chunks(path, data: np.ndarray, rows: int, filters: dict) -> list[bytes]:
    """Stored bytes of every chunk of ``data`` written by h5py with ``filters``."""
    with h5py.File(path, "w", libver="latest") as h5:
        dataset = h5.create_dataset("d", data=data, chunks=(rows, *data.shape[1:]), **filters)
        h5.flush()  # HDF5 2.0: a chunk still in the chunk cache has no stored size yet
        zeros = (0,) * (data.ndim - 1)
        stored = []
        for start in range(0, len(data), rows):
            mask, raw = dataset.id.read_direct_chunk((start, *zeros))
            assert mask == 0  # every filter applied
            stored.append(raw)
        return stored


def split_checksum(raw: bytes) -> tuple[bytes, int]:
    return raw[:-4], int.from_bytes(raw[-4:], "little")


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 719, 720, 721, 722, 2047, 2048, 2049, 5001])
@pytest.mark.parametrize("fill", ["random", 0x00, 0xFF, 0x80])
def test_fletcher32_matches_the_reference_loop(size, fill):
    if fill == "random":
        data = RNG.integers(0, 256, size, dtype=np.uint8).tobytes()
    else:
        data = bytes([fill]) * size
    assert fletcher32(data) == reference_fletcher32(data)


@pytest.mark.parametrize("size", [1, 15, 16, 17, 23, 24, 25, 47, 48, 49, 97, 500])
def test_fletcher32_segments_and_tail_rows_add_up(size):
    # small rows and segments exercise the joins that 1 MiB chunks hit rarely
    for data in (RNG.integers(0, 256, size, dtype=np.uint8), np.full(size, 0xFF, np.uint8)):
        expected = reference_fletcher32(data.tobytes())
        for row_words, segment_rows in [(4, 3), (3, 1), (8, 2), (1, 1)]:
            assert _fletcher32(data, row_words, segment_rows) == expected


def test_fletcher32_accepts_arrays_and_refuses_strided_ones():
    data = RNG.normal(size=(10, 7))
    assert fletcher32(data) == reference_fletcher32(data.tobytes())
    assert fletcher32(memoryview(data.tobytes())) == reference_fletcher32(data.tobytes())
    with pytest.raises(ValueError, match="data must be C-contiguous; got an array with strides"):
        fletcher32(data[:, ::2])


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_hdf5_fletcher32_checksums_are_ours(tmp_path, case):
    data, rows = EDGE_CASES[case]
    for filters in (FILTERS["fletcher32"], FILTERS["zstd5+fletcher32"]):
        for raw in hdf5_chunks(tmp_path / "h.h5", data, rows, filters):
            body, stored = split_checksum(raw)
            assert fletcher32(body) == stored


@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("filters", ["fletcher32", "none"])
def test_uncompressed_chunks_are_byte_identical_to_hdf5(tmp_path, case, filters):
    data, rows = EDGE_CASES[case]
    codec = codec_for_filters(tmp_path, FILTERS[filters], data, rows)
    theirs = hdf5_chunks(tmp_path / "h.h5", data, rows, FILTERS[filters])
    ours = [bytes(codec.encode(chunk)) for chunk in padded_chunks(data, rows)]
    assert ours == theirs


@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("filters", ["zstd5+fletcher32", "zstd5", "zstd_default+fletcher32",
                                     "zstd1+fletcher32"])
def test_zstd_chunks_decode_like_hdf5s(tmp_path, case, filters):
    # Frames need not be byte-identical (zstd versions differ); contents must be.
    data, rows = EDGE_CASES[case]
    codec = codec_for_filters(tmp_path, FILTERS[filters], data, rows)
    theirs = hdf5_chunks(tmp_path / "h.h5", data, rows, FILTERS[filters])
    for chunk, their_raw in zip(padded_chunks(data, rows), theirs, strict=True):
        our_raw = codec.encode(chunk)
        if codec.fletcher32:
            our_raw, checksum = split_checksum(our_raw)
            assert checksum == fletcher32(our_raw)
            their_raw, _ = split_checksum(their_raw)
        assert zstandard.ZstdDecompressor().decompress(our_raw) == chunk.tobytes()
        assert zstandard.ZstdDecompressor().decompress(their_raw) == chunk.tobytes()


@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("filters", list(FILTERS))
def test_hdf5_reads_our_chunks_back(tmp_path, case, filters):
    data, rows = EDGE_CASES[case]
    with h5py.File(tmp_path / "ours.h5", "w", libver="latest") as h5:
        dataset = h5.create_dataset("d", shape=data.shape, dtype=data.dtype,
                                    chunks=(rows, *data.shape[1:]), **FILTERS[filters])
        codec = codec_for(dataset)
        assert codec is not None
        zeros = (0,) * (data.ndim - 1)
        for index, chunk in enumerate(padded_chunks(data, rows)):
            dataset.id.write_direct_chunk((index * rows, *zeros), codec.encode(chunk))
    with h5py.File(tmp_path / "ours.h5", "r") as h5:
        assert np.array_equal(h5["d"][:], data)


def test_hdf5_verifies_fletcher32_of_direct_chunks(tmp_path):
    # the check is live: a chunk whose stored checksum is off by one bit fails the read
    data = RNG.integers(0, 256, (20, 30), dtype=np.uint8)
    with h5py.File(tmp_path / "bad.h5", "w", libver="latest") as h5:
        dataset = h5.create_dataset("d", shape=data.shape, dtype=data.dtype, chunks=(10, 30),
                                    **FILTERS["zstd5+fletcher32"])
        codec = codec_for(dataset)
        assert codec is not None
        good = codec.encode(np.ascontiguousarray(data[:10]))
        bad = bytearray(codec.encode(np.ascontiguousarray(data[10:])))
        bad[-1] ^= 0x01  # only the checksum: the zstd frame stays valid
        dataset.id.write_direct_chunk((0, 0), good)
        dataset.id.write_direct_chunk((10, 0), bytes(bad))
    with h5py.File(tmp_path / "bad.h5", "r") as h5:
        assert np.array_equal(h5["d"][:10], data[:10])
        with pytest.raises(OSError, match="filter returned failure during read"):
            h5["d"][10:]


def test_fill_value_padding_is_what_hdf5_stores(tmp_path):
    data = RNG.integers(0, 200, (7, 3), dtype=np.uint8)
    with h5py.File(tmp_path / "fill.h5", "w", libver="latest") as h5:
        dataset = h5.create_dataset("d", shape=(0, 3), maxshape=(None, 3), chunks=(10, 3),
                                    dtype=np.uint8, fletcher32=True, fillvalue=7)
        dataset.resize(7, axis=0)
        dataset[:] = data
        h5.flush()
        _, theirs = dataset.id.read_direct_chunk((0, 0))
        codec = codec_for(dataset)
    assert codec is not None
    (chunk,) = padded_chunks(data, 10, fill=7)
    assert codec.encode(chunk) == theirs


def codec_for_filters(tmp_path, filters: dict, data: np.ndarray, rows: int) -> ChunkCodec:
    with h5py.File(tmp_path / "probe.h5", "w", libver="latest") as h5:
        dataset = h5.create_dataset("d", shape=data.shape, dtype=data.dtype,
                                    chunks=(rows, *data.shape[1:]), **filters)
        codec = codec_for(dataset)
    assert codec is not None
    return codec


@pytest.mark.parametrize(("overrides", "expected"), [
    (None, ChunkCodec(zstd_level=5, fletcher32=True)),
    ({"compression": None}, ChunkCodec(zstd_level=None, fletcher32=True)),
    ({"fletcher32": False}, ChunkCodec(zstd_level=5, fletcher32=False)),
    ({"compression": None, "fletcher32": False}, ChunkCodec(zstd_level=None, fletcher32=False)),
    (dict(hdf5plugin.Zstd(clevel=19)), ChunkCodec(zstd_level=19, fletcher32=True)),
    (dict(hdf5plugin.Zstd()), ChunkCodec(zstd_level=3, fletcher32=True)),
    ({"compression": 32015, "compression_opts": (22,)}, ChunkCodec(zstd_level=22, fletcher32=True)),
    ({"compression": "gzip"}, None),
    ({"compression": "lzf"}, None),
    ({"shuffle": True}, None),
    ({"compression": None, "fletcher32": False, "scaleoffset": 0}, None),
    ({"compression": 32015, "compression_opts": (0,)}, None),
    ({"compression": 32015, "compression_opts": (5, 1)}, None),
    (dict(hdf5plugin.LZ4()), None),
])
def test_codec_for_reads_the_dataset_pipeline(tmp_path, overrides, expected):
    with h5py.File(tmp_path / "p.h5", "w", libver="latest") as h5:
        dataset = h5.create_dataset("d", shape=(0, 4), maxshape=(None, 4), chunks=(10, 4),
                                    dtype=np.uint16, **dataset_kwargs(overrides))
        assert codec_for(dataset) == expected


def test_from_filters_wants_fletcher32_last():
    assert ChunkCodec.from_filters([(3, ()), (32015, (5,))]) is None
    assert ChunkCodec.from_filters([(3, ()), (3, ())]) is None
    assert ChunkCodec.from_filters([(32015, (5,)), (3, ())]) == ChunkCodec(zstd_level=5,
                                                                            fletcher32=True)


def test_dataset_filters_lists_ids_and_cd_values(tmp_path):
    with h5py.File(tmp_path / "p.h5", "w", libver="latest") as h5:
        dataset = h5.create_dataset("d", shape=(4,), chunks=(2,), dtype=np.uint8,
                                    **dataset_kwargs(None))
        assert dataset_filters(dataset) == [(32015, (5,)), (3, ())]


def test_codec_checks_its_arguments():
    with pytest.raises(ValueError, match="zstd_level must be from 1 to 22 or None; got 0"):
        ChunkCodec(zstd_level=0)
    with pytest.raises(TypeError, match=r"zstd_level must be an int or None; got 5\.0"):
        ChunkCodec(zstd_level=5.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fletcher32 must be a bool; got 1"):
        ChunkCodec(fletcher32=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk must be C-contiguous"):
        ChunkCodec(fletcher32=True).encode(np.zeros((4, 4))[:, ::2])


def test_codec_without_filters_hands_out_the_chunk_bytes():
    chunk = RNG.integers(0, 256, (3, 5), dtype=np.uint8)
    assert bytes(ChunkCodec().encode(chunk)) == chunk.tobytes()
