"""The shared state behind an EventQueue: one segment, a token pipe, a descriptor socket.

Layout of the segment (its size is fixed when the queue is created)::

    [header: 4 KiB]                int64 fields (the ring's :class:`~.._ring.ring.Field`)
    [slots region]                 SlotLayout.region_nbytes(slots), once the schema is known
                                   (feature-major: see :class:`._spec.SlotLayout`)
    ...                            unused when the slots do not fill the budget
    [owners: MAX_SLOTS int64]      who holds each slot (see below)
    [schema: 64 KiB]               the schema as JSON, once published

The creator makes the segment with :func:`._segment.create_segment` and unlinks
its name at once: the memory then lives exactly as long as some process holds
the segment's file descriptor or a mapping of it. It cannot leak (the kernel
frees it when the last user exits, however it exits) and it cannot be removed
while a user still needs it. Processes receive the descriptor when the queue is
pickled into them, the way a ``multiprocessing.Queue`` passes its pipe.

Free slots are int32 tokens in a pipe: a producer reads ``4 * n`` bytes to take
``n`` slots, a consumer writes the tokens back when it has copied a frame out.
Every write is a whole number of tokens of at most ``PIPE_BUF`` bytes (atomic
by POSIX), and Linux serves each read of a pipe whole under the pipe's own
lock, so every read of ``4 * n`` bytes gets whole tokens: no lock of ours.
Descriptors travel through a ``SOCK_SEQPACKET`` socket pair: each record is
one message, sent and received whole, so any number of producers and
consumers may share it.

``owners[slot]`` is 0 for a free slot, ``+pid`` while producer ``pid`` fills it,
:data:`IN_FLIGHT` once its descriptor was sent, and ``-pid`` while consumer
``pid`` copies it out. Whoever waits (a producer for slots, a consumer for
frames) returns the slots of dead holders to the pipe. The two things that
must happen once (publishing the schema, reclaiming) are guarded by ``fcntl``
record locks on the segment, which the kernel drops when the holder dies.

A producer waiting for a slot must know whether anyone will ever free one.
Every process that takes a frame (``get``, ``lease``) registers as a consumer
once: it opens the segment anew (its own open file description, through
``/proc/self/fd``) and holds a shared open-file-description lock
(``F_OFD_SETLK``) on one byte of it, and stamps its pid in the header. The
kernel drops that lock when the consumer closes the queue or dies, however it
dies. A waiting producer asks the kernel (``F_OFD_GETLK``) whether any such
lock is held: no lock after a consumer had registered means the consumers are
gone (:meth:`QueueShared.consumers_alive`). Until the first consumer
registers, the queue's creator stands for it. Being per open file
description, the lock is neither lost when this process closes another
descriptor of the segment nor hidden from producers in the same process.
BEWARE: a process killed in the few instructions between taking a token and
stamping its pid (or between receiving a descriptor and stamping its own)
takes that slot with it; the queue goes on with one slot fewer.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import mmap
import os
import select
import socket
import struct
import termios
import threading
import time
from array import array
from collections.abc import Sequence
from typing import Literal

import numpy as np

from .._channel.records import Record, decode_records, write_record
from .._liveness import is_alive
from .._ring.ring import HEADER_NBYTES, MAX_SLOTS, QUEUE_MAGIC, Field, RingSpec, SlotRing, State
from .._ring.segment import create_unlinked_segment
from .._spec import Feature, Schema, SlotLayout
from ..errors import BrokenError

__all__ = ["IN_FLIGHT", "QueueShared", "budget_nbytes", "lock_publish",
           "segment_nbytes", "slots_that_fit", "unlock_publish"]

logger = logging.getLogger(__name__)

#: Owner value of a slot whose descriptor is on its way to a consumer.
IN_FLIGHT = -1
_OWNERS_NBYTES = 131072  # >= MAX_SLOTS * 8, a whole number of pages
_SCHEMA_NBYTES = 65536
_TAIL_NBYTES = _OWNERS_NBYTES + _SCHEMA_NBYTES
_TOKEN_PIPE_NBYTES = 65536
_TOKENS_PER_WRITE = select.PIPE_BUF // 4
_SOCKET_BUFFER_NBYTES = 4 * 2**20
_LOCK_PUBLISH, _LOCK_RECLAIM = 0, 1  # byte offsets locked in the segment file
_LOCK_CONSUMER = 2  # byte every consumer holds a shared OFD lock on
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on 64-bit Linux: type, whence, start, len, pid


def segment_nbytes(layout: SlotLayout, slots: int) -> int:
    """Bytes of a segment holding ``slots`` slots of ``layout``.

    :func:`slots_that_fit` gives exactly ``slots`` back for it (up to MAX_SLOTS).
    """
    return HEADER_NBYTES + _slots_room(layout, slots) + _TAIL_NBYTES


def slots_that_fit(nbytes: int, layout: SlotLayout) -> int:
    """Slots of ``layout`` a segment of ``nbytes`` holds (at most MAX_SLOTS, 0 if none).

    Never more than fit: ``layout.region_nbytes`` of the answer is at most the
    room between the header and the tail.
    """
    room = _whole_int64s(nbytes - HEADER_NBYTES - _TAIL_NBYTES)
    fits = (room - _padding_room(layout)) // _slot_cost(layout)
    return max(0, min(MAX_SLOTS, fits))


def budget_nbytes(memory_budget_nbytes: int) -> int:
    """Segment size for a budget of the slots region, plus the fixed parts (no rounding up)."""
    return HEADER_NBYTES + _whole_int64s(memory_budget_nbytes) + _TAIL_NBYTES


# The segment's size is all that tells a publisher how many slots the creator meant, but
# a feature-major region can hold several slot counts in the same bytes (the padding of
# its blocks absorbs them). So the queue books each slot at its unpadded size (at least
# 8 bytes, so that every count gives a different whole number of int64s) plus, once, the
# most padding any region has: every count then has its own size, and that size holds
# its region. A budget may so leave up to ~64 bytes per feature unused.

def _slots_room(layout: SlotLayout, slots: int) -> int:
    """Bytes the segment sets aside for ``slots`` slots: a whole number of int64s."""
    return -(-slots * _slot_cost(layout) // 8) * 8 + _padding_room(layout)


def _slot_cost(layout: SlotLayout) -> int:
    return max(8, layout.slot_nbytes)


def _padding_room(layout: SlotLayout) -> int:
    return -(-layout.max_padding_nbytes // 8) * 8


def _whole_int64s(nbytes: int) -> int:
    """``nbytes`` rounded down to whole int64s: the owners table after the slots must stay
    aligned, as several processes write its int64s."""
    return nbytes // 8 * 8


class QueueShared:
    """This process's handles on one queue's shared state.

    Use :meth:`create` (the queue's creator) or :meth:`from_fds` (a process the
    queue was pickled into). :meth:`close` releases this process's handles and
    is idempotent; nothing needs unlinking (see the module docstring).
    """

    _mmap: mmap.mmap | None = None
    _fds: tuple[int, ...] = ()

    def __init__(self, name: str, nbytes: int, fds: tuple[int, int, int, int, int],
                 mapping: mmap.mmap) -> None:
        self.name, self.nbytes = name, nbytes
        self._fds = fds
        self.segment_fd, self.desc_send, self.desc_recv, self.token_read, self.token_write = fds
        self._mmap = mapping
        base = np.frombuffer(mapping, dtype=np.uint8)
        self.header = base[:HEADER_NBYTES].view(np.int64)
        tail = nbytes - _TAIL_NBYTES
        self.owners = base[tail:tail + _OWNERS_NBYTES].view(np.int64)
        self._schema_text = base[tail + _OWNERS_NBYTES:]
        self.ring: SlotRing | None = None
        self._thread_locks = (threading.Lock(), threading.Lock())
        self._consumer_fd: int | None = None  # our own open file description, once a consumer
        self._consumer_lock = threading.Lock()

    # -- creation and attachment ---------------------------------------------------
    @classmethod
    def create(cls, nbytes: int, slot_events: int) -> QueueShared:
        """Make the segment (unlinked at once), the token pipe and the descriptor socket."""
        name, segment_fd, mapping = create_unlinked_segment(nbytes)
        opened: list[int] = [segment_fd]
        try:
            send, recv = _socket_pair()
            opened += [send, recv]
            token_read, token_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            opened += [token_read, token_write]
            _size_token_pipe(token_write)
        except BaseException:
            for fd in opened:
                os.close(fd)
            mapping.close()
            raise
        shared = cls(name, nbytes, (opened[0], send, recv, token_read, token_write), mapping)
        shared.header[Field.MAGIC] = QUEUE_MAGIC
        shared.header[Field.OWNER_PID] = os.getpid()
        shared.header[Field.SLOT_EVENTS] = slot_events
        return shared

    @classmethod
    def from_fds(cls, name: str, nbytes: int, fds: tuple[int, int, int, int, int]) -> QueueShared:
        """Map the segment behind ``fds[0]``; this process owns the five descriptors."""
        try:
            mapping = mmap.mmap(fds[0], nbytes)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        shared = cls(name, nbytes, fds, mapping)
        if shared.header[Field.MAGIC] != QUEUE_MAGIC:
            shared.close()
            raise BrokenError(f"segment {name!r} is not an EventQueue segment")
        return shared

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called in this process."""
        return self._mmap is None

    def close(self) -> None:
        """Release this process's descriptors and mapping (views handed out keep it mapped)."""
        consumer_fd, self._consumer_fd = self._consumer_fd, None
        fds, self._fds = self._fds, ()
        if consumer_fd is not None:
            fds = (consumer_fd, *fds)  # closing it drops our consumer lock
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        if self._mmap is None:
            return
        mapping, self._mmap = self._mmap, None
        self.header = self.owners = self._schema_text = None  # type: ignore[assignment]
        if self.ring is not None:
            self.ring.close()  # closes the mapping too
            self.ring = None
            return
        try:
            mapping.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes when it is freed

    # -- schema ------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Whether the schema is published and the slots are handed out."""
        return int(self.header[Field.STATE]) == State.RUNNING

    def stored_schema(self) -> Schema | None:
        """The schema text in the segment, once complete (even if not yet RUNNING)."""
        nbytes = int(self.header[Field.QUEUE_SCHEMA_NBYTES])
        if nbytes == 0:
            return None
        text = self._schema_text[:nbytes].tobytes().decode("utf-8")
        return Schema({name: Feature(spec["dtype"], tuple(spec["shape"]))
                       for name, spec in json.loads(text).items()})

    def publish(self, schema: Schema, *, inferred: bool) -> None:
        """Store ``schema``, size the slots, hand out every slot's token; the caller holds the lock.

        If an earlier publisher died halfway, its stored schema wins over
        ``schema`` (tokens may already be out for its slot size).

        Raises
        ------
        ValueError
            If not one slot of the schema fits the segment.
        """
        if self.ready:
            return
        stored = self.stored_schema()
        if stored is None:
            layout = SlotLayout(schema=schema, slot_events=int(self.header[Field.SLOT_EVENTS]))
            slots = slots_that_fit(self.nbytes, layout)
            if slots < 1:
                room = self.nbytes - HEADER_NBYTES - _TAIL_NBYTES
                raise ValueError(
                    f"memory_budget_nbytes={room} cannot hold one slot of "
                    f"{_slots_room(layout, 1)} bytes for the schema {schema!r}; raise "
                    f"memory_budget_nbytes or lower slot_events")
            text = json.dumps(schema.to_dict()).encode("utf-8")
            if len(text) > _SCHEMA_NBYTES:
                raise ValueError(f"the schema's description takes {len(text)} bytes; at most "
                                 f"{_SCHEMA_NBYTES} fit")
            self._schema_text[:len(text)] = np.frombuffer(text, np.uint8)
            self.header[Field.SLOTS] = slots
            self.header[Field.QUEUE_INFERRED] = int(inferred)
            self.header[Field.QUEUE_PUBLISHER_PID] = os.getpid()
            # the schema is complete from here on
            self.header[Field.QUEUE_SCHEMA_NBYTES] = len(text)
        # nobody takes a token before RUNNING, so the pipe holds exactly the tokens
        # 0..k-1 that an earlier publisher managed to write
        issued = self.free_tokens()
        self.give_slots(list(range(issued, int(self.header[Field.SLOTS]))))
        self.header[Field.STATE] = State.RUNNING

    def bind_ring(self, schema: Schema) -> SlotRing:
        """The slots as a :class:`SlotRing` view (once RUNNING)."""
        if self.ring is None:
            assert self._mmap is not None
            layout = SlotLayout(schema=schema, slot_events=int(self.header[Field.SLOT_EVENTS]))
            spec = RingSpec(name=self.name, layout=layout, slots=int(self.header[Field.SLOTS]),
                            total_frames=None)
            self.ring = SlotRing(spec, self._mmap, owner=False)
        return self.ring

    # -- locks (fcntl record locks: the kernel drops them when the holder dies) -----------
    def try_lock(self, which: int) -> bool:
        """Take lock ``which`` without waiting; True if this thread has it now."""
        thread_lock = self._thread_locks[which]
        if not thread_lock.acquire(blocking=False):
            return False  # record locks are per process: exclude our own threads first
        try:
            fcntl.lockf(self.segment_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, which)
        except OSError as exc:
            thread_lock.release()
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        return True

    def unlock(self, which: int) -> None:
        """Release lock ``which`` taken with :meth:`try_lock`."""
        try:
            fcntl.lockf(self.segment_fd, fcntl.LOCK_UN, 1, which)
        finally:
            self._thread_locks[which].release()

    # -- slots -----------------------------------------------------------------------------
    def free_tokens(self) -> int:
        """Slots free right now (tokens in the pipe)."""
        raw = fcntl.ioctl(self.token_read, termios.FIONREAD, b"\0\0\0\0")
        return int(struct.unpack("i", raw)[0]) // 4

    def take_slots(self, count: int) -> list[int]:
        """Take ``count`` slots at once, or none (``[]``) if fewer are free; never waits."""
        if self.free_tokens() < count:
            return []
        try:
            raw = os.read(self.token_read, 4 * count)
        except BlockingIOError:
            return []
        if len(raw) % 4:
            raise BrokenError(f"the slot token pipe of {self.name!r} holds a partial token")
        slots = list(array("i", raw))
        if len(slots) < count:  # another process took some meanwhile: hold none while waiting
            self.give_slots(slots)
            return []
        self.owners[slots] = os.getpid()
        return slots

    def give_slots(self, slots: Sequence[int]) -> None:
        """Mark ``slots`` free and put their tokens back in the pipe."""
        if not len(slots):
            return
        self.owners[list(slots)] = 0
        for start in range(0, len(slots), _TOKENS_PER_WRITE):
            # at most PIPE_BUF bytes: written whole; the pipe holds every token at once
            os.write(self.token_write, array("i", slots[start:start + _TOKENS_PER_WRITE]))

    def wait_for_tokens(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` until some token is in the pipe."""
        select.select([self.token_read], [], [], max(0.0, timeout_s))

    def reclaim_dead(self) -> int:
        """Free the slots held by processes that died; return how many. Never waits."""
        if not self.ready or not self.try_lock(_LOCK_RECLAIM):
            return 0
        try:
            owners = self.owners[:int(self.header[Field.SLOTS])]
            held = owners[(owners > 0) | (owners < IN_FLIGHT)]
            pids = set(np.abs(held).tolist()) - {os.getpid()}
            dead = [pid for pid in pids if not is_alive(pid)]
            if not dead:
                return 0
            mask = np.isin(np.abs(owners), dead) & (owners != IN_FLIGHT)
            slots = np.flatnonzero(mask).tolist()
            self.give_slots(slots)
            logger.warning("took back %d slot(s) held by dead process(es) %s", len(slots),
                           sorted(dead))
            return len(slots)
        finally:
            self.unlock(_LOCK_RECLAIM)

    # -- consumers ---------------------------------------------------------------------------
    def register_consumer(self) -> None:
        """Mark this process as a consumer until it closes the queue or exits. Idempotent.

        Raises
        ------
        OSError
            If the segment cannot be opened anew through ``/proc/self/fd``.
        """
        if self._consumer_fd is not None:
            return
        with self._consumer_lock:
            if self._consumer_fd is not None:
                return
            fd = os.open(f"/proc/self/fd/{self.segment_fd}", os.O_RDWR | os.O_CLOEXEC)
            try:
                # shared locks never conflict with each other and nobody takes an exclusive
                # one (producers only ask), so this never waits
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK,
                            _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, _LOCK_CONSUMER, 1, 0))
            except BaseException:
                os.close(fd)
                raise
            self._consumer_fd = fd
            self.header[Field.QUEUE_CONSUMER_PID] = os.getpid()  # after the lock: seen => locked

    def consumers_alive(self) -> Literal["alive", "none yet", "gone"]:
        """Whether some process that takes frames from the queue is still there. Never waits.

        ``"none yet"``: no process has registered as a consumer so far (the
        queue's creator then stands for one, see :meth:`creator_alive`).
        """
        if self._consumer_fd is not None:
            return "alive"  # we are one
        # read before asking: a consumer registering between the two then counts as
        # "none yet", never as "gone"
        seen = int(self.header[Field.QUEUE_CONSUMER_PID])
        raw = fcntl.fcntl(self.segment_fd, fcntl.F_OFD_GETLK,
                          _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, _LOCK_CONSUMER, 1, 0))
        if _FLOCK.unpack(raw)[0] != fcntl.F_UNLCK:
            return "alive"  # some consumer holds its shared lock
        return "gone" if seen else "none yet"

    def creator_alive(self) -> bool:
        """Whether the process that created the queue is alive."""
        pid = int(self.header[Field.OWNER_PID])
        return pid == os.getpid() or is_alive(pid)

    # -- descriptors -------------------------------------------------------------------------
    def send(self, record: bytes, timeout_s: float) -> None:
        """Send one descriptor record (TimeoutError if no consumer makes room in time)."""
        write_record(self.desc_send, record, timeout_s)

    def receive(self, timeout_s: float) -> Record | None:
        """The next record, or None if none arrived within ``timeout_s``."""
        ready, _, _ = select.select([self.desc_recv], [], [], max(0.0, timeout_s))
        if not ready:
            return None
        try:
            raw = os.read(self.desc_recv, select.PIPE_BUF)
        except BlockingIOError:
            return None  # another consumer took it
        records = list(decode_records(bytearray(raw)))
        if len(records) != 1:
            raise BrokenError(f"a descriptor message of {len(raw)} bytes held "
                              f"{len(records)} records; expected 1")
        return records[0]

    def empty(self) -> bool:
        """Whether no descriptor is waiting right now."""
        ready, _, _ = select.select([self.desc_recv], [], [], 0.0)
        return not ready

    def fds(self) -> tuple[int, int, int, int, int]:
        """The five descriptors, for pickling."""
        if len(self._fds) != 5:
            raise BrokenError("the queue's descriptors are closed in this process")
        segment, send, recv, token_read, token_write = self._fds
        return segment, send, recv, token_read, token_write


def lock_publish(shared: QueueShared, deadline: float) -> bool:
    """Wait until the publish lock is ours (True) or the schema is ready (False)."""
    while True:
        if shared.ready:
            return False
        if shared.try_lock(_LOCK_PUBLISH):
            return True
        if time.monotonic() >= deadline:
            pid = int(shared.header[Field.QUEUE_PUBLISHER_PID])
            raise TimeoutError(f"the queue's schema was not published in time (publisher pid "
                               f"{pid or 'unknown'})")
        time.sleep(0.002)


def unlock_publish(shared: QueueShared) -> None:
    """Release the lock taken by :func:`lock_publish`."""
    shared.unlock(_LOCK_PUBLISH)


def _socket_pair() -> tuple[int, int]:
    """A non-blocking SOCK_SEQPACKET pair as (send fd, receive fd)."""
    send, recv = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        for sock in (send, recv):
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER_NBYTES)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER_NBYTES)
        return send.detach(), recv.detach()
    except BaseException:
        send.close()
        recv.close()
        raise


def _size_token_pipe(fd: int) -> None:
    """Make sure the token pipe can hold every token at once (so a give never blocks)."""
    size = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    if size < _TOKEN_PIPE_NBYTES:
        size = fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _TOKEN_PIPE_NBYTES)
    if size < 4 * MAX_SLOTS:
        raise OSError(f"the slot token pipe holds {size} bytes; {4 * MAX_SLOTS} are needed")

