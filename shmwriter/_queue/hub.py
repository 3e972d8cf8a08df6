"""The hub of an EventQueue: the one place that knows who holds which slot.

A thread of the queue's creator runs :class:`QueueHub`. It serves the same
protocol as a Writer's loop (see :mod:`.._channel`): every thread of every
process that uses the queue attaches by its ticket and gets a channel of its
own (two pipes, passed with the segment's descriptor over the attach socket).
Through it the client asks for slots (REQUEST), sends frames (FRAME), takes
frames (TAKE) and frees their slots (DONE). The hub keeps the slots in the
same :class:`~.._write.slots.SlotAllocator` as a Writer and learns that a
client is gone the same way, from :class:`~.._write.channels.Channels`: end of
file on its pipe, or its process found dead. Its slots come back at once:

* slots granted and not yet sent as a frame go back to the free ones;
* frames sent to the hub and not yet taken stay for the next consumer;
* frames a consumer took and did not finish are dropped, as an ``mp.Queue``
  item taken by a process that then dies (their slots are freed).

A producer never waits for a consumer that is gone: once some client has
taken a frame, a request that cannot be served while no such client is left
is refused (REFUSED), and the producer raises BrokenError. Before any client
took a frame, the creator (whose thread this is) stands for the consumer.

The queue ends with its creator: :meth:`QueueHub.stop` (the creator's
``close``) or the creator's exit ends every channel, and the clients raise
BrokenError.
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import selectors
import threading
import time

from .._channel.attach import AttachServer
from .._channel.records import MAX_SLOTS_PER_RECORD, Kind, Record, encode_record
from .._forks import close_in_forked_children
from .._ring.ring import MAX_SLOTS, Field, State
from .._write.channels import Channels, ProducerChannel
from .._write.slots import SlotAllocator, SlotRequest
from .segment import QueueSegment

__all__ = ["NO_EVENTS", "REFUSED_NO_CONSUMER", "QueueHub"]

logger = logging.getLogger(__name__)

#: Event count of a frame put as ``(index, None)``, so that get() returns None again.
NO_EVENTS = 2**32 - 1
#: Reason of a REFUSED record: every client that took frames is gone.
REFUSED_NO_CONSUMER = 1
_LIVENESS_INTERVAL_S = 0.5
_STOP_TIMEOUT_S = 10.0


class QueueHub:
    """Serves one queue's slots and frames from a thread of its own.

    Parameters
    ----------
    segment
        The queue's segment; its schema may be published already.
    """

    def __init__(self, segment: QueueSegment) -> None:
        self.segment = segment
        #: Name of the attach socket (abstract namespace) and the secret it asks for.
        self.address = f"shmwriter/{segment.name}"
        self.secret = secrets.token_hex(32)
        self._selector = selectors.DefaultSelector()
        self._channels = Channels(self._selector)
        self._slots: SlotAllocator | None = None
        self._waiting_frames: collections.deque[Record] = collections.deque()
        self._takers: dict[int, int] = {}  # frames each client asked for, in asking order
        self._taken: dict[int, list[tuple[int, ...]]] = {}  # per client: slots of its frames
        self._consumer_pids: set[int] = set()  # processes that took frames
        self._last_consumer_pid = 0
        self._status_asked: list[ProducerChannel] = []  # answered once the round is done
        self._publisher: int | None = None
        self._want_to_publish: collections.deque[int] = collections.deque()
        if segment.ready or segment.stored_schema() is not None:
            self._start_slots()
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._server = AttachServer(self.address, self.secret, pass_fds=(segment.fd,),
                                    closing_text="the queue was closed by its creator")
        self._thread = threading.Thread(target=self._serve, name="shmwriter-queue-hub",
                                        daemon=True)
        self._thread.start()
        close_in_forked_children(self)

    def _close_after_fork(self) -> None:
        """In a forked child: close the copies of the hub's own descriptors (the channels
        and the attach socket close theirs themselves)."""
        if self._stop_w >= 0:
            self._selector.close()
            for fd in (self._stop_r, self._stop_w):
                os.close(fd)
            self._stop_r = self._stop_w = -1

    def stop(self) -> None:
        """End the queue: close every channel and the attach socket (idempotent)."""
        if self._stop_w < 0:
            return
        os.write(self._stop_w, b"x")
        self._thread.join(_STOP_TIMEOUT_S)
        self._server.close()
        for channel in self._channels:
            self._channels.retire(channel)
        self._selector.close()
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        self._stop_r = self._stop_w = -1

    # -- the thread ---------------------------------------------------------------------
    def _serve(self) -> None:
        self._selector.register(self._stop_r, selectors.EVENT_READ, "stop")
        self._selector.register(self._server.wakeup_fd, selectors.EVENT_READ, "attach")
        next_check = time.monotonic() + _LIVENESS_INTERVAL_S
        try:
            while True:
                wait = max(0.0, next_check - time.monotonic())
                readable = []
                for key, _ in self._selector.select(wait):
                    if key.data == "stop":
                        return
                    if key.data == "attach":
                        self._channels.add(self._server.take(), peer_is_user=True)
                    else:
                        readable.append(key.data)
                self._on_readable(readable)
                if time.monotonic() >= next_check:
                    for channel in self._channels.dead():
                        self._retire(channel, "died")
                    next_check = time.monotonic() + _LIVENESS_INTERVAL_S
                self._settle()
        except BaseException:  # a bug: end the queue rather than leave clients waiting
            logger.exception("the EventQueue's hub failed; the queue is closed")
            for channel in self._channels:
                self._channels.retire(channel)

    def _on_readable(self, channels: list[ProducerChannel]) -> None:
        """Read every channel first, retire the ended ones, then handle the records.

        A client that died had its pipes closed before anyone could learn of its
        death, so a request read in the same round (``free_slots`` after a
        ``join``, say) already sees the slots it held come back.
        """
        received = [(channel, self._channels.read(channel)) for channel in channels]
        for channel, got in received:
            if got is None:  # every copy of its pipe end is closed
                self._retire(channel, "went away")
        for channel, got in received:
            for record in got[0] if got else ():
                if channel.done:
                    break
                self._on_record(channel, record)

    def _on_record(self, channel: ProducerChannel, record: Record) -> None:
        kind = record.kind
        if kind in (Kind.REQUEST, Kind.REQUEST_NOW):
            self._on_request(channel, record)
        elif kind == Kind.FRAME:
            self._on_frame(channel, record)
        elif kind == Kind.TAKE:
            self._on_take(channel, max(1, record.nevents), now=bool(record.value))
        elif kind == Kind.RETURN:
            self._on_return(channel, record)
        elif kind == Kind.DONE:
            self._on_done(channel, record.slots)
        elif kind == Kind.RELEASE and self._slots is not None:
            self._slots.release(channel.id, list(record.slots))
        elif kind == Kind.CANCEL:
            self._on_cancel(channel)
        elif kind == Kind.STATUS:
            self._status_asked.append(channel)
        elif kind == Kind.PUBLISH:
            self._on_publish(channel)
        elif kind == Kind.PUBLISHED:
            self._on_published(channel, ok=bool(record.value))
        elif kind == Kind.CLOSE:
            self._retire(channel, "closed")
        else:
            self._refuse(channel, f"sent a record of kind {kind}, which a queue does not take")

    # -- slots ------------------------------------------------------------------------
    def _start_slots(self) -> None:
        """The schema is in the segment: hand out its slots from now on."""
        slots = self.segment.slots
        if not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"the published schema gives {slots} slots")
        # no slots granted ahead: a thread that put a frame and then idles must not sit on
        # slots that a large frame of another thread needs (it would wait for ever)
        self._slots = SlotAllocator(slots, prefetch=0)
        self.segment.header[Field.STATE] = State.RUNNING

    def _on_request(self, channel: ProducerChannel, record: Record) -> None:
        slots = self._slots
        most = min(slots.slots, MAX_SLOTS_PER_RECORD) if slots is not None else 0
        if slots is None or not 1 <= record.nevents <= most:
            self._refuse(channel, f"asked for {record.nevents} slots")
            return
        self._drop_request(channel.id)  # a client asks again after it gave up waiting
        now = record.kind == Kind.REQUEST_NOW
        request = SlotRequest(record.value, channel.id, record.nevents)
        if now and not slots.can_grant_now(request):
            self._answer(channel, encode_record(Kind.NOTHING))
            return
        slots.request(request)
        if now:  # served before anything else read in this round can queue ahead of it
            self._grant_and_hand_out()

    def _on_cancel(self, channel: ProducerChannel) -> None:
        """Withdraw what the client waits for; a GRANT or FRAME already sent stays its."""
        self._drop_request(channel.id)
        self._takers.pop(channel.id, None)
        self._answer(channel, encode_record(Kind.NOTHING))

    def _drop_request(self, client: int) -> None:
        if self._slots is not None:
            self._slots.withdraw(client)

    def _settle(self) -> None:
        """Grant what can be granted, hand out frames, refuse what can never come; then
        answer STATUS: after everything read in the same round (a thread that ended just
        before, say), so that the answer includes it."""
        self._grant_and_hand_out()
        asked, self._status_asked = self._status_asked, []
        for channel in asked:
            # the slots granted ahead to the asking client are free for it
            free = self._slots.nfree + len(self._slots.granted_to(channel.id)) \
                if self._slots is not None else 0
            self._answer(channel, encode_record(Kind.STATUS, free, len(self._waiting_frames)))

    def _a_consumer_is_left(self) -> bool:
        """Whether a process that took frames still has the queue open (a channel)."""
        return any(channel.pid in self._consumer_pids for channel in self._channels
                   if not channel.done)

    def _grant_and_hand_out(self) -> None:
        slots = self._slots
        if slots is None:
            return
        for grant in slots.grant_pending():
            self._answer(self._channels[grant.producer],
                         encode_record(Kind.GRANT, slots=grant.slots))
        while self._takers and self._waiting_frames:  # one frame each in turn
            client = next(iter(self._takers))
            wanted = self._takers.pop(client)
            if wanted > 1:
                self._takers[client] = wanted - 1
            self._hand_out(client, self._waiting_frames.popleft())
        if slots.pending and self._consumer_pids and not self._a_consumer_is_left():
            for request in list(slots.pending):
                self._answer(self._channels[request.producer], encode_record(
                    Kind.REFUSED, REFUSED_NO_CONSUMER, self._last_consumer_pid))
            slots.drop_pending()

    # -- frames -----------------------------------------------------------------------
    def _on_frame(self, channel: ProducerChannel, record: Record) -> None:
        slots = list(record.slots)
        if record.nevents in (0, NO_EVENTS):
            expected = 0
        else:
            per_slot = self.segment.slot_events
            expected = -(-record.nevents // per_slot)
        if len(slots) != expected:
            self._refuse(channel, f"sent frame {record.value} of {record.nevents} events in "
                                  f"{len(slots)} slots")
            return
        if slots:
            assert self._slots is not None  # owns() below needs granted slots
            if not self._slots.owns(channel.id, slots):
                self._refuse(channel, f"sent frame {record.value} in slots not granted to it")
                return
            self._slots.hold(channel.id, slots)
        self._waiting_frames.append(record)

    def _on_take(self, channel: ProducerChannel, count: int, *, now: bool) -> None:
        if channel.pid not in self._consumer_pids:
            self._consumer_pids.add(channel.pid)
            self._last_consumer_pid = channel.pid
            self.segment.header[Field.QUEUE_CONSUMER_PID] = channel.pid
        if now:  # what waits now (after those who asked before), then NOTHING
            for _ in range(min(count, len(self._waiting_frames))):
                self._hand_out(channel.id, self._waiting_frames.popleft())
            self._answer(channel, encode_record(Kind.NOTHING))
        else:
            self._takers[channel.id] = self._takers.get(channel.id, 0) + count

    def _on_return(self, channel: ProducerChannel, record: Record) -> None:
        """A frame taken and not used goes back to the front of the queue."""
        taken = self._taken.get(channel.id, [])
        if record.slots:
            if record.slots not in taken:
                self._refuse(channel, f"returned slots {list(record.slots)[:8]} of no frame "
                                      f"it took")
                return
            taken.remove(record.slots)
        self._waiting_frames.appendleft(
            Record(Kind.FRAME, record.value, record.nevents, record.slots))

    def _hand_out(self, client: int, record: Record) -> None:
        channel = self._channels[client]
        if record.slots:  # freed by the client's DONE
            self._taken.setdefault(client, []).append(record.slots)
        self._answer(channel, encode_record(Kind.FRAME, record.value, record.nevents,
                                            record.slots))

    def _on_done(self, channel: ProducerChannel, slots: tuple[int, ...]) -> None:
        taken = self._taken.get(channel.id, [])
        if not slots or slots not in taken:
            self._refuse(channel, f"freed slots {list(slots)[:8]} of no frame it took")
            return
        taken.remove(slots)
        if self._slots is not None:
            self._slots.free(list(slots))

    # -- the schema ---------------------------------------------------------------------
    def _on_publish(self, channel: ProducerChannel) -> None:
        if self._slots is not None:
            self._answer(channel, encode_record(Kind.PUBLISH, 0))
        elif self._publisher is None:
            self._publisher = channel.id
            self._answer(channel, encode_record(Kind.PUBLISH, 1))
        else:
            self._want_to_publish.append(channel.id)

    def _on_published(self, channel: ProducerChannel, *, ok: bool) -> None:
        if channel.id != self._publisher:
            self._refuse(channel, "published the schema without being asked to")
            return
        self._publisher = None
        if ok:
            try:
                if self.segment.stored_schema() is None:
                    raise ValueError("no schema text in the segment")
                self._start_slots()
            except ValueError as exc:
                self._refuse(channel, f"published a schema that cannot be used ({exc})")
                self._pass_publishing()
                return
            for client in [channel.id, *self._want_to_publish]:
                self._answer(self._channels[client], encode_record(Kind.PUBLISH, 0))
            self._want_to_publish.clear()
        else:
            self._pass_publishing()

    def _pass_publishing(self) -> None:
        """The publisher gave up or went away: the next client that asked may publish."""
        while self._want_to_publish and self._publisher is None:
            client = self._want_to_publish.popleft()
            if not self._channels[client].done:
                self._publisher = client
                self._answer(self._channels[client], encode_record(Kind.PUBLISH, 1))

    # -- clients ------------------------------------------------------------------------
    def _answer(self, channel: ProducerChannel, record: bytes) -> None:
        """Send ``record`` to the client; one that reads nothing while its pipe fills is gone.

        A client has at most a few answers on their way (one per request), so
        a full pipe means it does not play by the protocol.
        """
        if not channel.done and not self._channels.send_bytes(channel, record):
            self._retire(channel, "reads no answers")

    def _refuse(self, channel: ProducerChannel, why: str) -> None:
        logger.error("queue client %d (pid %d) %s; closing its channel", channel.id,
                     channel.pid, why)
        self._retire(channel, "was refused")

    def _retire(self, channel: ProducerChannel, why: str) -> None:
        """Forget a client: its granted slots come back, its unfinished frames are freed."""
        if not self._channels.retire(channel):
            return
        logger.debug("queue client %d (pid %d) %s", channel.id, channel.pid, why)
        if self._slots is not None:
            self._slots.retire(channel.id)
            for slots in self._taken.pop(channel.id, []):
                self._slots.free(list(slots))
        self._takers.pop(channel.id, None)
        if channel.id in self._want_to_publish:
            self._want_to_publish.remove(channel.id)
        if self._publisher == channel.id:
            self._publisher = None
            self._pass_publishing()
