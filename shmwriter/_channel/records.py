"""The channel between one producer and the writer (or an EventQueue's hub): two pipes.

``desc`` carries fixed-format records from the producer to the writer (a
16-byte header plus 4 bytes per slot; a batch of frames adds 12 bytes per
frame, and a packed batch lists its first slot only); ``grant`` carries int32
slot indices from the writer to the producer. An EventQueue's hub answers in
records instead (GRANT, FRAME, NOTHING, ...), as its clients also take frames.
Every record is written with one ``write`` of at most ``PIPE_BUF`` bytes,
which POSIX makes atomic, so no lock is needed between processes and a killed
producer cannot leave a torn record or a held lock behind. End of file on a
pipe means the other side is gone.
"""

from __future__ import annotations

import enum
import os
import select
import struct
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

from ..errors import BrokenError

__all__ = ["GRANT_NONE", "GRANT_REFUSED", "MAX_FRAMES_PER_RECORD", "MAX_SLOTS_PER_RECORD",
           "Kind", "Record", "decode_records", "encode_packed", "encode_record", "open_pipe_pair",
           "read_grants", "split_packed", "write_record"]

_HEADER = struct.Struct("<BxHIq")
_BATCH_FRAME = struct.Struct("<qI")
#: Most slots a single frame record can list (the record must fit PIPE_BUF).
MAX_SLOTS_PER_RECORD = (select.PIPE_BUF - _HEADER.size) // 4
#: Most frames a PACKED record can list.
MAX_FRAMES_PER_RECORD = (select.PIPE_BUF - _HEADER.size) // _BATCH_FRAME.size
#: Grant value telling a producer the writer refuses it (see the header's error text).
GRANT_REFUSED = -1
#: Grant value telling a producer that its REQUEST_NOW or CANCEL got nothing (more).
GRANT_NONE = -2


class Kind(enum.IntEnum):
    """What a record from a producer says."""

    HELLO = 1     # value = pid of the process using the producer
    REQUEST = 2   # value = the frame they are for, nevents = slots wanted
    FRAME = 3     # value = frame index, nevents, slots listed
    RELEASE = 4   # slots listed are given back unused
    CLOSE = 5     # the producer is done
    REQUEST_RUN = 7  # as REQUEST, for consecutive slots (Producer.frames writes in place)
    PACKED = 8    # value = first slot, nevents = frames listed as (frame, nevents): their
    #               events back to back from that slot on (no slot list)
    # -- used between an EventQueue's clients and its hub (see shmwriter._queue.hub) --
    REQUEST_NOW = 9  # as REQUEST, answered at once: GRANT, or NOTHING (the writer's too)
    CANCEL = 10   # withdraw the request or TAKE outstanding; answered by NOTHING (after a
    #               GRANT or FRAME already on its way, if any)
    TAKE = 11     # send up to nevents frames (at least 1); value = 1: those waiting now, then
    #               NOTHING; 0: each when it comes (until CANCEL)
    DONE = 12     # the slots listed held a frame taken: free them
    STATUS = 13   # how many slots are free; answered by STATUS (value = free slots,
    #               nevents = frames waiting for a consumer)
    PUBLISH = 14  # may I publish the schema? answered by PUBLISH (value = 1: yours to
    #               publish, 0: it is published)
    PUBLISHED = 15  # value = 1: the schema is in the segment, 0: gave up
    GRANT = 16    # hub -> client: the slots listed are granted
    NOTHING = 17  # hub -> client: no slot or no frame for the request
    REFUSED = 18  # hub -> client: the request is dropped; value = reason, nevents = a pid
    RETURN = 19   # as FRAME: a frame taken and not used, back to the front of the queue
    REQUEST_RUN_NOW = 20  # producer -> writer: as REQUEST_RUN, answered at once (GRANT or
    #                       NOTHING), for put_many and frames() with timeout_s=0
    MALFORMED = 255  # what decode_records makes of a record that cannot be one


_PACKED = int(Kind.PACKED)  # a plain int: compared once per record


class Record(NamedTuple):
    """One decoded record from a producer (a named tuple: the writer makes one per frame)."""

    kind: int
    """A :class:`Kind` value (unchecked: the writer validates it)."""
    value: int
    """Frame index (FRAME, REQUEST, REQUEST_RUN), pid (HELLO), first slot (PACKED), or 0."""
    nevents: int
    """Events of the frame (FRAME), slots wanted (REQUEST, REQUEST_RUN), or 0."""
    slots: tuple[int, ...]
    """Slot indices (FRAME, RELEASE)."""
    frames: tuple[tuple[int, int], ...] = ()
    """``(frame, nevents)`` of each frame of a PACKED record, in order."""


def encode_record(kind: Kind, value: int = 0, nevents: int = 0,
                  slots: Sequence[int] = ()) -> bytes:
    """Bytes of one record; ``slots`` must fit :data:`MAX_SLOTS_PER_RECORD`."""
    if len(slots) > MAX_SLOTS_PER_RECORD:
        raise ValueError(f"a record lists at most {MAX_SLOTS_PER_RECORD} slots; got {len(slots)}")
    return _HEADER.pack(kind, len(slots), nevents, value) + array("i", slots).tobytes()


def split_packed(frames: Sequence[tuple[int, int]], slots_for: Callable[[int], int],
                 most_slots: int) -> Iterator[list[tuple[int, int]]]:
    """``(frame, nevents)`` pairs cut into parts that fit one PACKED record, their events
    back to back in at most ``most_slots`` slots (``slots_for(nevents)`` of them). A frame
    needing more slots than that is a part of its own."""
    part: list[tuple[int, int]] = []
    nevents = 0
    for frame, count in frames:
        if part and (len(part) == MAX_FRAMES_PER_RECORD
                     or slots_for(nevents + count) > most_slots):
            yield part
            part, nevents = [], 0
        part.append((frame, count))
        nevents += count
    if part:
        yield part


def encode_packed(frames: Sequence[tuple[int, int]], first_slot: int) -> bytes:
    """Bytes of one PACKED record: frames whose events lie back to back from ``first_slot``."""
    if len(frames) > MAX_FRAMES_PER_RECORD:
        raise ValueError(f"{len(frames)} frames do not fit one record of {select.PIPE_BUF} "
                         f"bytes; at most {MAX_FRAMES_PER_RECORD}")
    body = b"".join(_BATCH_FRAME.pack(frame, nevents) for frame, nevents in frames)
    return _HEADER.pack(Kind.PACKED, 0, len(frames), first_slot) + body


def decode_records(buffer: bytearray) -> Iterator[Record]:
    """Yield the complete records at the start of ``buffer`` and remove them from it.

    A record whose header announces more than fits one write (a forged one)
    comes out as ``Kind.MALFORMED``, so that the writer can refuse its sender.
    """
    pos, end = 0, len(buffer)
    view = memoryview(buffer)
    try:
        while end - pos >= _HEADER.size:
            kind, nslots, nevents, value = _HEADER.unpack_from(view, pos)
            nframes = nevents if kind == _PACKED else 0
            if _HEADER.size + _BATCH_FRAME.size * nframes + 4 * nslots > select.PIPE_BUF:
                pos = end  # nothing after it can be trusted
                yield Record(Kind.MALFORMED, value, nevents, ())
                break
            start = pos + _HEADER.size + _BATCH_FRAME.size * nframes
            stop = start + 4 * nslots
            if stop > end:
                break
            slots = tuple(array("i", bytes(view[start:stop]))) if nslots else ()
            frames = tuple(_BATCH_FRAME.iter_unpack(bytes(view[pos + _HEADER.size:start]))) \
                if nframes else ()
            pos = stop
            yield Record(kind, value, nevents, slots, frames)
    finally:
        view.release()
        del buffer[:pos]


def open_pipe_pair() -> tuple[tuple[int, int], tuple[int, int]]:
    """Make the two pipes; return ``(producer_fds, writer_fds)``.

    ``producer_fds`` is ``(desc_write, grant_read)`` and ``writer_fds`` is
    ``(desc_read, grant_write)``; all are non-blocking and close-on-exec.
    """
    desc_read, desc_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    grant_read, grant_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    return (desc_write, grant_read), (desc_read, grant_write)


def write_record(fd: int, record: bytes, timeout_s: float) -> None:
    """Write one record, waiting at most ``timeout_s`` for room in the pipe.

    Raises
    ------
    BrokenError
        If the writer closed its end (it died or finished).
    TimeoutError
        If the writer did not read for ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.write(fd, record)  # <= PIPE_BUF: all or nothing
            return
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"the writer read no descriptor for {timeout_s:.1f} s; "
                    f"its descriptor pipe is full") from None
            select.select([], [fd], [], remaining)
        except BrokenPipeError as exc:
            raise BrokenError("the writer closed the descriptor channel") from exc


def read_grants(fd: int, timeout_s: float) -> list[int] | None:
    """Wait up to ``timeout_s`` for grants; return them, [] on timeout, None at EOF."""
    ready, _, _ = select.select([fd], [], [], max(timeout_s, 0.0))
    if not ready:
        return []
    try:
        raw = os.read(fd, 65536)
    except BlockingIOError:
        return []
    if not raw:
        return None
    # grants are written as whole int32 values by one writer, never split
    return list(array("i", raw[:len(raw) - len(raw) % 4]))
