"""One thread's channel to an EventQueue's hub, and the ticket that opens it.

A :class:`QueueTicket` is what an EventQueue pickles into: the hub's attach
socket, its secret, the segment's size and the creator's pid; no file
descriptors. :func:`open_client` attaches: the hub passes the two pipe ends
of a new channel and the segment's descriptor. :class:`QueueClient` speaks the
protocol of :mod:`.hub` over it: slots through the same
:class:`~.._channel.grants.SlotGrants` as a Writer's producer, frames taken,
the schema published, and the hub's answers sorted as they come.
"""

from __future__ import annotations

import collections
import math
import os
import select
import time
import weakref
from dataclasses import dataclass, field

from .._channel.attach import boot_id, check_same_host, pid_namespace, request_channel
from .._channel.grants import SlotGrants
from .._channel.records import (
    GRANT_NONE,
    GRANT_REFUSED,
    Kind,
    Record,
    decode_records,
    encode_record,
    write_record,
)
from .._forks import close_in_forked_children
from ..errors import BrokenError, ClosedError, RingFullError
from .hub import REFUSED_NO_CONSUMER

__all__ = ["MAX_READ_AHEAD", "FrameReader", "QueueClient", "QueueTicket",
           "new_ticket", "open_client"]

#: Longest wait for an answer the hub gives at once (it serves requests in microseconds).
ANSWER_TIMEOUT_S = 10.0
_ATTACH_TIMEOUT_S = 10.0
_READ_NBYTES = 65536
_LONGEST_SELECT_S = 3600.0  # select() takes no infinite timeout: wait in slices this long
_FRAME, _NOTHING = frozenset((Kind.FRAME,)), frozenset((Kind.NOTHING,))
#: Most frames a reader keeps on their way: their records (at most PIPE_BUF bytes each) and
#: a few answers must fit the 64 KiB of its pipe, or the hub could not send them.
MAX_READ_AHEAD = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueTicket:
    """What a process needs to use an EventQueue (what the queue pickles into)."""

    address: str
    """Name of the hub's attach socket in the abstract namespace."""
    secret: str = field(repr=False)
    """Proves the holder was given the queue (hex)."""
    host: str
    """Boot id of the queue's machine."""
    pid_namespace: str
    """PID namespace of the queue's creator."""
    name: str
    """The segment's (unlinked) name, for messages."""
    nbytes: int
    """The segment's size."""
    creator_pid: int
    """Pid of the process whose hub serves the queue."""


def new_ticket(address: str, secret: str, name: str, nbytes: int) -> QueueTicket:
    """The ticket of a hub created in this process."""
    return QueueTicket(address=address, secret=secret, host=boot_id(),
                       pid_namespace=pid_namespace(), name=name, nbytes=nbytes,
                       creator_pid=os.getpid())


def open_client(ticket: QueueTicket) -> tuple[QueueClient, int]:
    """Attach a new channel; return the client and the segment's descriptor (the caller's).

    Raises
    ------
    BrokenError
        If the queue's creator closed the queue or exited.
    AttachError
        If the ticket is for another host or PID namespace, or the hub refused it.
    """
    check_same_host(ticket.host, ticket.pid_namespace)
    try:
        channel_id, (desc, reply, segment_fd) = request_channel(
            ticket.address, ticket.secret, _ATTACH_TIMEOUT_S, nfds=3)
    except ClosedError as exc:
        raise BrokenError(_gone_text(ticket.creator_pid, str(exc))) from None
    except TimeoutError:
        raise BrokenError(f"the queue's hub (pid {ticket.creator_pid}) did not answer within "
                          f"{_ATTACH_TIMEOUT_S:.0f} s") from None
    return QueueClient(channel_id, desc, reply, ticket.creator_pid), segment_fd


def _gone_text(creator_pid: int, reason: str = "") -> str:
    return reason or (f"the queue's creator (pid {creator_pid}) closed the queue or exited; "
                      f"its hub is gone")


class QueueClient:
    """This thread's channel to the hub: requests out, answers in.

    Parameters
    ----------
    channel_id
        The channel's id at the hub.
    desc_fd, reply_fd
        This end of the channel's two pipes (owned from now on).
    creator_pid
        Pid of the hub's process, for messages.
    """

    def __init__(self, channel_id: int, desc_fd: int, reply_fd: int, creator_pid: int) -> None:
        self.id = channel_id
        self._desc_fd, self._reply_fd = desc_fd, reply_fd
        self._creator_pid = creator_pid
        self._buffer = bytearray()
        self._grants: list[int] = []  # slot numbers (and GRANT_* values) not read yet
        self._answers: collections.deque[Record] = collections.deque()
        self._refusal: Record | None = None
        #: Frames received from the hub, in all.
        self.frames_received = 0
        self._leases = 0  # frames taken through this channel and not released yet
        self._close_when_released = False
        self._shut = False  # closed by another thread of this process: see shut()
        self._pid = os.getpid()
        self.grants = self._new_grants()
        close_in_forked_children(self)

    def _new_grants(self) -> SlotGrants:
        # through a weak proxy: no reference cycle, so the channel closes the moment its
        # thread ends (threading.local drops it) rather than at some later garbage collection
        me = weakref.proxy(self)
        return SlotGrants(lambda record: me.send(record),
                          lambda timeout_s: me._read_grants(timeout_s),
                          lambda: me._writer_gone(),
                          lambda frame, nslots, timeout_s: "no free slot")

    @property
    def closed(self) -> bool:
        """Whether the channel is closed (by :meth:`close`, or the hub went away)."""
        return self._desc_fd < 0

    def close(self) -> None:
        """Say goodbye and close the channel (idempotent): slots held come back.

        Only the thread that uses the channel closes it; others :meth:`shut` it.
        """
        if self._desc_fd < 0:
            return
        if os.getpid() == self._pid and not self._shut:
            self._say_close()
        for fd in (self._desc_fd, self._reply_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self._desc_fd = self._reply_fd = -1

    def shut(self) -> None:
        """End the channel from another thread (``EventQueue.close``), without closing its
        descriptors under the thread that may be waiting on them: the hub closes its ends,
        and that thread's wait ends with ClosedError."""
        if self._desc_fd >= 0 and not self._shut:
            self._shut = True
            self._say_close()

    def _say_close(self) -> None:
        try:
            os.write(self._desc_fd, encode_record(Kind.CLOSE))
        except OSError:
            pass  # the hub is gone already

    def took_lease(self) -> None:
        """A frame taken through this channel is held (its slots are freed by DONE)."""
        self._leases += 1

    def released_lease(self) -> None:
        """A lease of this channel was released; close if that was waited for."""
        self._leases -= 1
        if self._close_when_released and self._leases <= 0:
            self.close()

    def close_when_released(self) -> None:
        """Close now, or once the leases still held are released (closing frees their slots)."""
        if self._leases <= 0:
            self.close()
        else:
            self._close_when_released = True

    def _close_after_fork(self) -> None:
        """In a forked child: close the copies of the pipe ends, saying nothing to the hub."""
        for fd in (self._desc_fd, self._reply_fd):
            if fd >= 0:
                os.close(fd)
        self._desc_fd = self._reply_fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # a safety net at garbage collection: never raise from here
            pass

    # -- sending --------------------------------------------------------------------------
    def send(self, record: bytes) -> None:
        """Send one record (or a few, at most PIPE_BUF bytes) to the hub.

        Raises
        ------
        BrokenError
            If the hub is gone, or read nothing for ANSWER_TIMEOUT_S.
        """
        if self._desc_fd < 0 or self._shut:
            raise self._ended()
        try:
            write_record(self._desc_fd, record, ANSWER_TIMEOUT_S)
        except (BrokenError, TimeoutError):
            self.close()
            raise self._ended() from None

    # -- answers ---------------------------------------------------------------------------
    def answer(self, kinds: frozenset[int], timeout_s: float) -> Record | None:
        """The next answer of one of ``kinds``; None if none came within ``timeout_s``.

        Raises
        ------
        BrokenError
            If the hub went away.
        """
        deadline = _deadline(timeout_s)
        while True:
            for record in self._answers:
                if record.kind in kinds:
                    self._answers.remove(record)
                    if record.kind == Kind.NOTHING:  # its copy for SlotGrants goes too
                        self._grants.remove(GRANT_NONE)
                    return record
            if not self._read(_remaining(deadline)):
                if math.isfinite(deadline) and _remaining(deadline) <= 0:
                    return None

    def ask(self, record: bytes, kinds: frozenset[int]) -> Record:
        """Send ``record`` and wait for the hub's answer of one of ``kinds`` (given at once)."""
        self.send(record)
        return self._prompt_answer(kinds)

    def _prompt_answer(self, kinds: frozenset[int]) -> Record:
        """The answer the hub gives at once; BrokenError if none came in ANSWER_TIMEOUT_S."""
        answer = self.answer(kinds, ANSWER_TIMEOUT_S)
        if answer is None:
            raise BrokenError(f"the queue's hub (pid {self._creator_pid}) did not answer "
                              f"within {ANSWER_TIMEOUT_S:.0f} s")
        return answer

    def _read(self, timeout_s: float) -> bool:
        """Read what the hub sent within ``timeout_s``; False if nothing came."""
        if self._reply_fd < 0:
            raise self._ended()
        ready, _, _ = select.select([self._reply_fd], [], [], min(timeout_s, _LONGEST_SELECT_S))
        if not ready:
            return False
        try:
            raw = os.read(self._reply_fd, _READ_NBYTES)
        except BlockingIOError:
            return False
        if not raw:
            self.close()
            raise self._ended()
        self._buffer += raw
        for record in decode_records(self._buffer):
            if record.kind == Kind.GRANT:
                self._grants.extend(record.slots)
            elif record.kind == Kind.NOTHING:
                self._grants.append(GRANT_NONE)  # SlotGrants ends its wait on it
                self._answers.append(record)  # and so does a TAKE's wait
            elif record.kind == Kind.REFUSED:
                self._refusal = record
                self._grants.append(GRANT_REFUSED)
            else:
                self.frames_received += record.kind == Kind.FRAME
                self._answers.append(record)
        return True

    def _read_grants(self, timeout_s: float) -> list[int] | None:
        """SlotGrants' view of the answers: the slots granted, [] on timeout."""
        if not self._grants:
            try:
                self._read(max(0.0, timeout_s))
            except BrokenError:
                return None
        grants, self._grants = self._grants, []
        # a NOTHING answers either SlotGrants (REQUEST_NOW, CANCEL) or a TAKE: whoever
        # waits for it takes it, and the other's copy goes
        for _ in range(grants.count(GRANT_NONE)):
            self._answers.remove(next(r for r in self._answers if r.kind == Kind.NOTHING))
        return grants

    def _ended(self) -> Exception:
        """The error of a channel that ended: closed in this process, or the hub is gone."""
        if self._shut:
            return ClosedError("this EventQueue was closed in this process")
        return BrokenError(_gone_text(self._creator_pid))

    def _writer_gone(self) -> Exception:
        refusal, self._refusal = self._refusal, None
        if refusal is None:
            return self._ended()
        self.grants = self._new_grants()  # the hub dropped the request: nothing is owed
        if refusal.value == REFUSED_NO_CONSUMER:
            return BrokenError(f"the queue's consumer (pid {refusal.nevents}) is gone: no "
                               f"process takes frames from it any more")
        return BrokenError(f"the queue's hub refused the request (reason {refusal.value})")

    # -- requests --------------------------------------------------------------------------
    def take_frame(self, *, now: bool, timeout_s: float) -> Record | None:
        """Take one frame: at once (``now``) or within ``timeout_s``; None if none came."""
        self.send(encode_record(Kind.TAKE, int(now), 1))
        if now:
            return self._frames_then_nothing()
        try:
            answer = self.answer(_FRAME, timeout_s)
        except (BrokenError, ClosedError):
            raise
        except BaseException:  # a Ctrl-C, say: no frame may stay on its way to this channel
            self._withdraw_take()
            raise
        if answer is not None:
            return answer
        self.send(encode_record(Kind.CANCEL))  # withdraw the TAKE; a FRAME on its way comes first
        return self._frames_then_nothing()

    def _withdraw_take(self) -> None:
        """Best effort: withdraw the TAKE and return the frame that came meanwhile, if any."""
        try:
            self.send(encode_record(Kind.CANCEL))
            self.answer(_NOTHING, ANSWER_TIMEOUT_S)
            while (record := self.answer(_FRAME, 0.0)) is not None:
                self.give_back(record)
        except (BrokenError, ClosedError):
            pass

    def give_back(self, record: Record) -> None:
        """Return a frame received and not taken to the front of the queue."""
        self.send(encode_record(Kind.RETURN, record.value, record.nevents, record.slots))

    def frames_waiting(self) -> int:
        """Frames received and not taken by :meth:`take_frame` or :meth:`next_frame` yet."""
        return sum(record.kind == Kind.FRAME for record in self._answers)

    def next_frame(self, timeout_s: float) -> Record | None:
        """A frame received (reading what came within ``timeout_s``), or None."""
        return self.answer(_FRAME, timeout_s)

    def _frames_then_nothing(self) -> Record | None:
        """Read up to the hub's NOTHING; the first frame before it, if any."""
        self._prompt_answer(_NOTHING)
        return self.answer(_FRAME, 0.0)

    def take_slots(self, frame_index: int, nslots: int,
                   timeout_s: float | None) -> list[int] | None:
        """``nslots`` slots for ``frame_index``: at once (``timeout_s`` 0), within it, or
        whenever (None); None if they did not come in time.

        Raises
        ------
        BrokenError
            If the hub refused (no consumer left) or is gone.
        """
        deadline = _deadline(math.inf if timeout_s is None else max(0.0, timeout_s))
        try:
            if timeout_s == 0:
                return self.grants.take_now(frame_index, nslots, ANSWER_TIMEOUT_S)
            while True:
                try:
                    return self.grants.take(frame_index, nslots, min(_remaining(deadline),
                                                                      _LONGEST_SELECT_S))
                except RingFullError:
                    if _remaining(deadline) <= 0:
                        break
            self.grants.cancel(ANSWER_TIMEOUT_S)  # what came meanwhile serves the next put
        except RingFullError:
            pass  # take_now: not free now
        return None

    def status(self) -> tuple[int, int]:
        """``(free slots, frames waiting for a consumer)`` at the hub, now."""
        answer = self.ask(encode_record(Kind.STATUS), frozenset((Kind.STATUS,)))
        return answer.value, answer.nevents

    def publish_turn(self) -> bool:
        """Ask whether this client publishes the schema (True) or it is published (False).

        Waits while another client publishes (microseconds, or until it is gone).
        """
        self.send(encode_record(Kind.PUBLISH))
        answer = self.answer(frozenset((Kind.PUBLISH,)), math.inf)
        assert answer is not None
        return bool(answer.value)

    def published(self, *, ok: bool) -> None:
        """Tell the hub the schema is in the segment (``ok``) or that this client gave up."""
        self.send(encode_record(Kind.PUBLISHED, int(ok)))
        if ok:  # the hub answers once it hands out the schema's slots
            self.answer(frozenset((Kind.PUBLISH,)), ANSWER_TIMEOUT_S)


def _deadline(timeout_s: float) -> float:
    return time.monotonic() + timeout_s if math.isfinite(timeout_s) else math.inf


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic()) if math.isfinite(deadline) else math.inf


class FrameReader:
    """A consumer that keeps up to ``ahead`` frames coming, on a channel of its own.

    The hub sends it frames as they arrive, without a request per frame, so
    taking a frame costs no round trip. :meth:`close` withdraws what is still
    asked for and returns the frames received and not taken to the front of
    the queue (a reader that dies instead drops them, as a consumer that dies
    drops what it took).

    Parameters
    ----------
    client
        A channel of its own (the reader closes it).
    ahead
        Frames it may hold received and not taken.
    """

    def __init__(self, client: QueueClient, ahead: int) -> None:
        self.client, self._ahead = client, ahead
        self._asked = 0  # frames asked for, in all

    def take(self, timeout_s: float) -> Record | None:
        """The next frame: one received, or one that comes within ``timeout_s``."""
        self._ask_more()
        return self.client.next_frame(timeout_s)

    def _ask_more(self) -> None:
        """Keep ``ahead`` frames asked for or received; ask in batches of at least half."""
        client = self.client
        coming = self._asked - client.frames_received
        room = self._ahead - coming - client.frames_waiting()
        if room > 0 and (2 * room >= self._ahead or coming == 0):
            client.send(encode_record(Kind.TAKE, 0, room))
            self._asked += room

    def close(self) -> None:
        """Withdraw what is asked for and return what was received; close the channel."""
        client = self.client
        if client.closed:
            return
        try:
            client.send(encode_record(Kind.CANCEL))
            client.answer(_NOTHING, ANSWER_TIMEOUT_S)
            unused = []
            while (record := client.next_frame(0.0)) is not None:
                unused.append(record)
            for record in reversed(unused):  # each goes to the front: the first last
                client.give_back(record)
        except (BrokenError, ClosedError):
            pass  # the hub is gone: nothing to return to
        finally:
            client.close_when_released()
