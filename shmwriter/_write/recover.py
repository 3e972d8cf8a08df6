"""Make the file of a killed or failed writer open like any other HDF5 file.

A file written in SWMR mode (superblock version 3) carries file-consistency
flags that HDF5 sets while a writer has it open and clears on close. After a
writer was killed they stay set, and HDF5 refuses a plain (non-SWMR) open
until they are cleared, which is what ``h5clear -s`` does. The data flushed
before the kill is complete without that step (SWMR readers see it); this
only lets ordinary readers in. The flags are one byte of the superblock,
protected by a Jenkins lookup3 checksum, which is recomputed here.

When a write failed (a full disk), the superblock may already name an end of
file beyond the bytes that reached the disk; HDF5 then calls the file
truncated. Extending the file to that size with a hole (which needs no free
blocks) lets it open; the chunks that never reached the disk read as the fill
value, and everything flushed before the failure reads back intact.
"""

from __future__ import annotations

import os

__all__ = ["clear_write_flags", "discard_further_writes", "make_readable"]

_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_FLAGS_AT = 11  # signature, version, size of offsets, size of lengths, then the flags
_MASK = 0xFFFFFFFF


def make_readable(path: str | os.PathLike[str]) -> None:
    """Extend a short file to its stored end of file, then clear its write flags.

    BEWARE: only call this when the writer is known to be dead or failed.
    """
    with open(path, "rb") as file:
        head = file.read(12)
        _check_superblock(path, head)
        size_of_offsets = head[9]
        file.seek(12 + 2 * size_of_offsets)
        stored_eof = int.from_bytes(file.read(size_of_offsets), "little")
    if os.path.getsize(path) < stored_eof:
        os.truncate(path, stored_eof)  # a hole: no blocks needed, reads as zeros
    clear_write_flags(path)


def _check_superblock(path: str | os.PathLike[str], head: bytes) -> None:
    if head[:8] != _SIGNATURE or head[8] not in (2, 3):
        raise ValueError(f"{os.fspath(path)!r} has no HDF5 version 2/3 superblock at offset 0")


def clear_write_flags(path: str | os.PathLike[str]) -> bool:
    """Clear the write/SWMR flags of an HDF5 file no process has open; True if any were set.

    BEWARE: only call this when the writer is known to be dead.

    Raises
    ------
    ValueError
        If the file is not HDF5 with a version 2 or 3 superblock at offset 0.
    """
    with open(path, "r+b") as file:
        head = file.read(12)
        _check_superblock(path, head)
        size_of_offsets = head[9]
        nbytes = 12 + 4 * size_of_offsets  # four addresses follow the flags
        file.seek(0)
        block = bytearray(file.read(nbytes + 4))
        if block[_FLAGS_AT] == 0:
            return False
        block[_FLAGS_AT] = 0
        block[nbytes:] = lookup3(bytes(block[:nbytes])).to_bytes(4, "little")
        file.seek(0)
        file.write(block)
    return True


def discard_further_writes(fd: int) -> None:
    """Point ``fd`` (a failed HDF5 file's descriptor) at /dev/null.

    After a failed write HDF5 cannot flush its cached metadata, and closing
    the file (or the interpreter's exit) then crashes inside the library.
    With the descriptor on /dev/null those last writes go nowhere, the close
    succeeds, and the file on disk keeps what the last successful flush wrote.
    """
    null = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle`` of ``data``, as HDF5 checksums metadata."""
    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & _MASK
    pos = 0
    while length > 12:
        a = (a + int.from_bytes(data[pos:pos + 4], "little")) & _MASK
        b = (b + int.from_bytes(data[pos + 4:pos + 8], "little")) & _MASK
        c = (c + int.from_bytes(data[pos + 8:pos + 12], "little")) & _MASK
        a, b, c = _mix(a, b, c)
        length -= 12
        pos += 12
    if length == 0:
        return c
    tail = data[pos:pos + length] + bytes(12 - length)
    a = (a + int.from_bytes(tail[0:4], "little")) & _MASK
    b = (b + int.from_bytes(tail[4:8], "little")) & _MASK
    c = (c + int.from_bytes(tail[8:12], "little")) & _MASK
    return _final(a, b, c)


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    for shift_a, shift_b, shift_c in ((4, 6, 8), (16, 19, 4)):
        a = ((a - c) & _MASK) ^ _rot(c, shift_a)
        c = (c + b) & _MASK
        b = ((b - a) & _MASK) ^ _rot(a, shift_b)
        a = (a + c) & _MASK
        c = ((c - b) & _MASK) ^ _rot(b, shift_c)
        b = (b + a) & _MASK
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    c = ((c ^ b) - _rot(b, 14)) & _MASK
    a = ((a ^ c) - _rot(c, 11)) & _MASK
    b = ((b ^ a) - _rot(a, 25)) & _MASK
    c = ((c ^ b) - _rot(b, 16)) & _MASK
    a = ((a ^ c) - _rot(c, 4)) & _MASK
    b = ((b ^ a) - _rot(a, 14)) & _MASK
    c = ((c ^ b) - _rot(b, 24)) & _MASK
    return c
