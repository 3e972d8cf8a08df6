"""The writer loop: receive descriptors, grant slots, reorder, gather, hand chunks to HDF5.

One thread runs :class:`WriterLoop` (in the caller's process or in a writer
process of its own) and a second thread writes chunks to the file, so copying
out of the ring never waits for the disk longer than the bounded chunk queue
allows. The loop talks to the :class:`~shmwriter.Writer` over a control
socket (see :mod:`._control`): it sends a start notice, its log records and,
at the end, the :class:`RunResult`. Producers attach on the loop's attach
socket (see :mod:`._attach`), which hands each its own pipes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import selectors
import signal
import socket
import threading
import time
import zlib
from array import array
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._attach import Attached, AttachServer, Ticket
from ._channel import GRANT_REFUSED, Kind, Record, decode_records
from ._control import (
    MESSAGE_NBYTES,
    MSG_ABORT,
    MSG_HANDOUT_OVER,
    MSG_LOG,
    MSG_RESULT,
    MSG_STARTED,
)
from ._gather import Chunk, ChunkGatherer
from ._h5sink import H5Sink
from ._liveness import is_alive
from ._ranges import FrameRanges
from ._reorder import Arrival, ReorderBuffer
from ._ring import Field, RingSpec, SlotRing, State
from ._rtdc import LOG_LINE_LIMIT, RUN_LOG

__all__ = ["RunConfig", "RunResult", "WriterLoop", "run_in_process"]

logger = logging.getLogger(__name__)

_FREE, _HELD = -1, -2  # slot owner values besides producer ids
#: Highest frame index: the file stores frame indices as uint32.
MAX_FRAME_INDEX = 2**32 - 1
_LIVENESS_INTERVAL_S = 0.5
#: How long a request for a frame ahead of the waiting ones may wait before the writer
#: copies waiting frames out of the ring for it, beyond the reorder budget if need be.
_PATIENCE_S = 0.5
_CHUNK_QUEUE_SIZE = 1  # one chunk waits while one is written: bounded memory


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """Everything the writer loop needs; it pickles into a writer process."""

    path: str
    """The .rtdc file to write."""
    ring: RingSpec
    """The ring to attach to."""
    ticket: Ticket
    """The run's ticket: the loop listens at its address and checks its secret."""
    write_threshold: int
    """Frames per chunk."""
    flush_interval_s: float
    """Longest time gathered frames wait before they are written."""
    hdf5_dataset_kwargs: Mapping[str, Any] | None
    """Overrides of the dataset creation keywords."""
    metadata: Mapping[str, Any]
    """Root attributes."""
    derived: tuple[str, ...]
    """Per-event features the writer adds."""
    reorder_budget_nbytes: int
    """Most bytes of out-of-order frames copied out of the ring."""
    prefetch: int
    """Extra slots granted ahead to a producer while the ring is less than half full."""
    logs: Mapping[str, list[str]] = field(default_factory=dict)
    """Logs to add to the file at the end."""
    log_level: int = logging.WARNING
    """Level of the ``shmwriter`` logger in the process that made the Writer."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    """How a run ended, sent from the loop to the Writer."""

    state: State
    """DONE, FAILED or ABORTED."""
    written_events: int
    """Events in the file."""
    written_frames: int
    """Frames whose events are in the file (missing frames not counted)."""
    missing_frames: FrameRanges
    """Frames that never arrived (in an aborted run: gaps below the newest frame received)."""
    rejected_frames: int
    """Descriptors the writer refused (duplicates, forged or malformed)."""
    error: str | None = None
    """What went wrong, for FAILED; why, for ABORTED."""


@dataclass(slots=True)
class _Request:
    """A producer waiting for slots for one frame."""

    frame: int
    channel: _Channel
    wanted: int
    since: float = field(default_factory=time.monotonic)

    @staticmethod
    def frame_of(request: _Request) -> int:
        return request.frame


class _Channel:
    """The writer's view of one producer."""

    __slots__ = ("buffer", "desc_fd", "done", "grant_fd", "granted", "id", "pid")

    def __init__(self, producer_id: int, desc_fd: int, grant_fd: int) -> None:
        self.id, self.desc_fd, self.grant_fd = producer_id, desc_fd, grant_fd
        self.pid = 0
        self.buffer = bytearray()
        self.granted: set[int] = set()
        self.done = False


class WriterLoop:
    """Runs one run from start to end. Call :meth:`run` once.

    Parameters
    ----------
    config
        The run.
    control
        This end of the control socket (SOCK_SEQPACKET).
    """

    def __init__(self, config: RunConfig, control: socket.socket) -> None:
        self.config, self.control = config, control
        spec = config.ring
        self.ring: SlotRing | None = None
        self.owner = [_FREE] * spec.slots  # producer id, _FREE or _HELD, per slot
        self.free: deque[int] = deque(range(spec.slots))
        self.pending: deque[_Request] = deque()
        self.channels: dict[int, _Channel] = {}
        self.reorder = ReorderBuffer(spec.total_frames, config.reorder_budget_nbytes)
        self.gatherer = ChunkGatherer(spec.layout.schema, config.derived)
        self.chunks: queue.Queue[Chunk | None] = queue.Queue(_CHUNK_QUEUE_SIZE)
        self.selector = selectors.DefaultSelector()
        self.handout_over = self.producer_died = self.stopping = False
        #: Why the run is aborted; None while it is not.
        self.abort_reason: str | None = None
        self.rejected = self.written_frames = 0
        self.sink: H5Sink | None = None
        self.attach_server: AttachServer | None = None
        self.sink_error: BaseException | None = None
        #: What made the run fail, in one line (the errno's text first), or None.
        self.failure: str | None = None
        self._slot_views: list[dict[str, np.ndarray[Any, Any]]] = []
        self._feature_views: dict[str, np.ndarray[Any, Any]] = {}
        self._in_order: list[tuple[int, int, list[int]]] = []  # frontier frames not copied yet
        self._last_emit = time.monotonic()
        self._noted_budget = False

    # -- lifecycle --------------------------------------------------------------
    def run(self) -> RunResult:
        """Serve the run to its end and return how it ended (never raises)."""
        state, error = State.DONE, None
        writer_thread = None
        try:
            self.ring = SlotRing.attach(self.config.ring)
            self.ring.set(Field.WRITER_PID, os.getpid())
            self.ring.set(Field.START_TIME_NS, time.time_ns())
            layout = self.config.ring.layout
            self._feature_views = self.ring.feature_views()
            self._slot_views = [self.ring.slot_views(s, layout.slot_events, as_stored=True)
                                for s in range(self.config.ring.slots)]
            self.sink = H5Sink(self.config.path, layout.schema, self.config.derived,
                               self.config.hdf5_dataset_kwargs, self.config.metadata)
            writer_thread = threading.Thread(target=self._write_chunks, name="shmwriter-sink",
                                             daemon=True)
            writer_thread.start()
            self.attach_server = AttachServer(self.config.ticket)
            self.ring.set(Field.STATE, State.RUNNING)
            self.control.send(MSG_STARTED)
            self._serve()
            aborted = self.abort_reason is not None
            self._finish_frames(aborted)
            state = State.ABORTED if aborted else State.DONE
        except BaseException as exc:
            logger.error("the writer failed: %s", exc)
            logger.debug("where the writer failed", exc_info=True)
            cause = self.sink_error or exc
            self.failure = describe_failure(cause)
            where = f"writing {self.config.path} failed: " if self.sink_error else ""
            state, error = State.FAILED, f"{where}{self.failure}"
        finally:
            state, error = self._shut_down(writer_thread, state, error)
        if state is State.ABORTED:
            error = self.abort_reason
        return RunResult(state=state, written_events=self.sink.nevents if self.sink else 0,
                         written_frames=self.written_frames,
                         missing_frames=self.reorder.missing,
                         rejected_frames=self.rejected, error=error)

    def request_abort(self, reason: str) -> None:
        """End the run soon: take what was sent, write it, close the file (signal-safe)."""
        if self.abort_reason is None:
            self.abort_reason = reason

    def _serve(self) -> None:
        self.selector.register(self.control, selectors.EVENT_READ, None)
        assert self.attach_server is not None
        self.selector.register(self.attach_server.wakeup_fd, selectors.EVENT_READ,
                               self.attach_server)
        next_liveness = time.monotonic() + _LIVENESS_INTERVAL_S
        while not self._run_complete():
            timeout = min(next_liveness, self._last_emit + self.config.flush_interval_s)
            for key, _ in self.selector.select(max(0.0, timeout - time.monotonic())):
                if key.data is None:
                    self._on_control()
                elif key.data is self.attach_server:
                    self._add_channels(self.attach_server.take())
                else:
                    self._on_readable(key.data)
            self._raise_if_sink_failed()
            now = time.monotonic()
            if now >= next_liveness:
                self._check_liveness()
                next_liveness = now + _LIVENESS_INTERVAL_S
            if now - self._last_emit >= self.config.flush_interval_s:
                self._emit()
            self._settle_slots()
            self._publish()

    def _run_complete(self) -> bool:
        if self.abort_reason is not None:
            return True
        total = self.config.ring.total_frames
        if total is not None and self.reorder.frontier >= total:
            return True
        return self.handout_over and not any(not c.done for c in self.channels.values())

    def _finish_frames(self, aborted: bool) -> None:
        """Write every frame received, declaring the gaps between them missing.

        A run that ends normally also declares the frames after the last one
        received missing (up to ``total_frames``); an aborted run does not: it
        never reached them.
        """
        self._stop_attaching()
        if aborted:
            self._take_what_was_sent()
        while (lowest := self.reorder.lowest_waiting()) is not None:
            self._skip_missing(lowest)
            self._drain()
        if not aborted:
            self._skip_missing(self.reorder.end())
        self._emit()
        missing = self.reorder.missing
        if missing:  # expected when the run was stopped early: then worth no warning
            logger.log(logging.INFO if aborted else logging.WARNING,
                       "%d frame(s) never arrived: %s", len(missing), missing.summary())

    def _take_what_was_sent(self) -> None:
        """Aborting: read every descriptor sent so far, so no frame whose put() returned is lost.

        The header says ABORTING first: a producer checks it after it has sent
        a frame, and raises BrokenError for a frame sent after this point (it
        may be in the file or not), so that a put() that returned always means
        the frame is in the file or listed as missing.
        """
        assert self.ring is not None
        self.ring.set_error_text(f"the run was aborted: {self.abort_reason}")
        self.ring.set(Field.STATE, State.ABORTING)
        self.stopping = True
        self.pending.clear()
        for channel in list(self.channels.values()):
            while not channel.done and self._on_readable(channel):
                pass

    def _shut_down(self, writer_thread: threading.Thread | None, state: State,
                   error: str | None) -> tuple[State, str | None]:
        # producers whose channel closes from here on read the header to learn why
        self._announce(state, error)
        self._stop_attaching()
        for channel in list(self.channels.values()):
            self._retire(channel, "the run ended")
        if writer_thread is not None:
            self._put_chunk(None, wait_for_sink=False)
            writer_thread.join()
        if self.sink_error is not None and state is not State.FAILED:
            state = State.FAILED
            self.failure = describe_failure(self.sink_error)
            error = f"writing {self.config.path} failed: {self.failure}"
            self._announce(state, error)
        if self.sink is not None:
            if state is State.FAILED:
                self.sink.abandon(run_log=self._run_summary(state, error))
            else:
                try:
                    logs = {**self.config.logs, RUN_LOG: self._run_summary(state, error)}
                    self.sink.close(missing_frames=self.reorder.missing, logs=logs)
                except Exception as exc:
                    logger.exception("closing %s failed", self.config.path)
                    self.failure = describe_failure(exc)
                    state = State.FAILED
                    error = f"closing {self.config.path} failed: {self.failure}"
                    self.sink.record_failure(self._run_summary(state, error))
        if self.ring is not None:
            if error:
                self.ring.set_error_text(error)
            self._publish()
            self.written_frames = self.ring.get(Field.WRITTEN_FRAMES)
            self.ring.set(Field.STATE, state)
            self._slot_views, self._feature_views = [], {}
            self.ring.close()
        self.selector.close()
        return state, error

    def _announce(self, state: State, error: str | None) -> None:
        """Put how the run ends into the header, before any producer's channel closes."""
        if self.ring is None:
            return
        if state is State.FAILED:
            self.ring.set_error_text(error or "the writer failed")
            self.ring.set(Field.STATE, State.FAILED)
        elif state is State.DONE:
            self.ring.set(Field.STATE, State.CLOSING)

    def _run_summary(self, state: State, error: str | None) -> list[str]:
        """The lines of the run log: how the run ended, for readers of the file.

        Every line fits dclab's limit of 100 characters.
        """
        total = self.config.ring.total_frames
        written = self.ring.get(Field.WRITTEN_FRAMES) if self.ring is not None else 0
        lines = [f"state={state.name}",
                 f"total_frames={'open-ended' if total is None else total}",
                 f"frames_done={self.reorder.frontier}", f"written_frames={written}",
                 f"missing_frames={len(self.reorder.missing)}",
                 f"rejected_frames={self.rejected}"]
        if state is State.ABORTED:
            lines.append(f"reason={self.abort_reason}")
        if state is State.FAILED:
            lines.append(f"error={self.failure or error}")
        return [_fit(line) for line in lines]

    # -- control socket -----------------------------------------------------------
    def _on_control(self) -> None:
        try:
            message = self.control.recv(MESSAGE_NBYTES)
        except (ConnectionError, OSError):
            message = b""
        if not message:  # the Writer (the main process) is gone
            logger.warning("the controlling process went away; aborting the run")
            self.request_abort("the owner process went away")
            self.selector.unregister(self.control)
            return
        kind = message[:1]
        if kind == MSG_HANDOUT_OVER:
            self.handout_over = True
            if self.attach_server is not None:  # those attached until now still count
                self._add_channels(self.attach_server.close_to_new())
        elif kind == MSG_ABORT:
            self.request_abort(message[1:].decode("utf-8", "replace") or "aborted by the owner")

    # -- attaching ------------------------------------------------------------------
    def _add_channels(self, attached: list[Attached]) -> None:
        for new in attached:
            channel = _Channel(new.producer_id, new.desc_fd, new.grant_fd)
            self.channels[channel.id] = channel
            self.selector.register(channel.desc_fd, selectors.EVENT_READ, channel)

    def _stop_attaching(self) -> None:
        """Close the attach socket: a ticket used from now on finds the run ended.

        Channels attached until now are taken: what their producers send still counts.
        """
        if self.attach_server is not None:
            server, self.attach_server = self.attach_server, None
            with contextlib.suppress(KeyError):  # registered only once serving began
                self.selector.unregister(server.wakeup_fd)
            self._add_channels(server.close_to_new())
            server.close()

    # -- producers ----------------------------------------------------------------
    def _on_readable(self, channel: _Channel) -> bool:
        """Read and handle what the producer sent; False once nothing more is waiting."""
        try:
            raw = os.read(channel.desc_fd, 65536)
        except BlockingIOError:
            return False
        if not raw:  # every copy of its pipe end is closed: no CLOSE came first
            if channel.pid:  # a process used it: it died (or dropped it unclosed)
                logger.warning("producer %d (pid %d) went away without closing; taking back "
                               "its %d slot(s)", channel.id, channel.pid, len(channel.granted))
                self.producer_died = True
            self._retire(channel, "closed its end")
            return False
        self.ring.header[Field.DESCRIPTOR_NBYTES] += len(raw)  # type: ignore[union-attr]
        channel.buffer += raw
        for record in decode_records(channel.buffer):
            if channel.done:
                break
            self._on_record(channel, record)
        self._settle_slots()
        return not channel.done

    def _on_record(self, channel: _Channel, record: Record) -> None:
        kind = record.kind
        if kind == Kind.FRAME:
            self._on_frame(channel, record)
        elif kind == Kind.BATCH:
            self._on_batch(channel, record)
        elif kind == Kind.REQUEST:
            if not 1 <= record.nevents <= self.config.ring.slots:
                self._refuse(channel, f"asked for {record.nevents} slots")
            elif not self.stopping:
                self.pending.append(_Request(record.value, channel, record.nevents))
        elif kind == Kind.RELEASE:
            mine = [s for s in record.slots if s in channel.granted]
            self._free_slots(mine, channel)
        elif kind == Kind.HELLO:
            self._on_hello(channel, record.value)
        elif kind == Kind.CLOSE:
            self._retire(channel, "closed")
        elif kind == Kind.MALFORMED:
            self._refuse(channel, "sent a record larger than one write can be (forged?)")
        else:
            self._refuse(channel, f"sent a record of unknown kind {kind}")

    def _on_hello(self, channel: _Channel, pid: int) -> None:
        if channel.pid and channel.pid != pid and is_alive(channel.pid):
            self._refuse(channel, f"is used by two processes at once (pids {channel.pid} and "
                                  f"{pid}); give each process its own Writer.producer()")
            return
        channel.pid = pid
        self.ring.header[Field.PRODUCERS_SEEN] += 1  # type: ignore[union-attr]

    def _on_frame(self, channel: _Channel, record: Record) -> None:
        frame, nevents, slots = record.value, record.nevents, list(record.slots)
        problem = self._check_frame(channel, frame, nevents, slots)
        if problem:
            self.rejected += 1
            logger.error("producer %d: rejected frame %d: %s", channel.id, frame, problem)
            self._free_slots([s for s in set(slots) if s in channel.granted], channel)
            return
        channel.granted.difference_update(slots)
        for slot in slots:
            self.owner[slot] = _HELD
        self.reorder.newest = max(self.reorder.newest, frame)
        arrival = Arrival(frame, nevents, slots)
        if frame == self.reorder.frontier:
            self.reorder.frontier += 1
            self._gather(arrival)
            self._drain()
        else:
            # it waits in its slots (no copy) until the frontier reaches it, unless
            # the ring runs short: then _relieve_ring copies waiting frames out
            self.reorder.hold(arrival)

    def _on_batch(self, channel: _Channel, record: Record) -> None:
        """A batch is its frames in a row, each with its own slots, listed in order."""
        layout = self.config.ring.layout
        needed = [layout.slots_for(nevents) for _, nevents in record.frames]
        if sum(needed) != len(record.slots):
            self._refuse(channel, f"sent a batch of {len(record.frames)} frames needing "
                                  f"{sum(needed)} slots with {len(record.slots)} slots")
            return
        at = 0
        for (frame, nevents), count in zip(record.frames, needed, strict=True):
            self._on_frame(channel, Record(Kind.FRAME, frame, nevents,
                                           record.slots[at:at + count]))
            at += count
            if channel.done:
                return

    def _check_frame(self, channel: _Channel, frame: int, nevents: int,
                     slots: list[int]) -> str | None:
        total = self.config.ring.total_frames
        if frame < 0 or frame > MAX_FRAME_INDEX or (total is not None and frame >= total):
            return f"frame index out of range (total_frames={total})"
        if len(slots) != self.config.ring.layout.slots_for(nevents):
            return f"{nevents} events do not match {len(slots)} slots"
        if len(set(slots)) != len(slots) or not channel.granted.issuperset(slots):
            return f"slots {slots} were not granted to this producer"
        if self.reorder.is_known(frame):
            return "duplicate frame index: this frame was received already"
        return None

    def _refuse(self, channel: _Channel, why: str) -> None:
        logger.error("producer %d %s; refusing it", channel.id, why)
        self.ring.set_error_text(f"producer {channel.id} {why}")  # type: ignore[union-attr]
        self._send_grants(channel, [GRANT_REFUSED])
        self._retire(channel, "was refused")

    def _retire(self, channel: _Channel, why: str) -> None:
        """Forget a producer: take back its slots and close its pipes."""
        if channel.done:
            return
        channel.done = True
        logger.debug("producer %d %s", channel.id, why)
        self._free_slots(list(channel.granted), channel)
        self.pending = deque(r for r in self.pending if r.channel is not channel)
        self.selector.unregister(channel.desc_fd)
        os.close(channel.desc_fd)
        os.close(channel.grant_fd)
        self._grant_pending()

    def _check_liveness(self) -> None:
        for channel in list(self.channels.values()):
            if not channel.done and channel.pid and not is_alive(channel.pid):
                while self._on_readable(channel):
                    pass  # what it sent before it died is valid: take all of it
                if channel.done:
                    continue
                logger.warning("producer %d (pid %d) died; taking back its %d slot(s)",
                               channel.id, channel.pid, len(channel.granted))
                self.producer_died = True
                self._retire(channel, "died")
        if self.producer_died and not self.reorder.has_room(0):
            # a dead producer's frames will never come: stop waiting for them
            lowest = self.reorder.lowest_waiting()
            if lowest is not None and lowest > self.reorder.frontier:
                self._skip_missing(lowest)
                self._drain()

    # -- slots ----------------------------------------------------------------------
    def _grant_pending(self) -> None:
        """Grant waiting requests, the one for the lowest frame first.

        The frontier needs the lowest frames first: a producer running far
        ahead waits, instead of filling the ring with frames that cannot be
        written yet.
        """
        half = self.config.ring.slots // 2
        while self.pending and not self.stopping:
            request = min(self.pending, key=_Request.frame_of)
            if len(self.free) < request.wanted:
                return
            self.pending.remove(request)
            extra = min(self.config.prefetch, max(0, len(self.free) - request.wanted - half))
            grant = [self.free.popleft() for _ in range(request.wanted + extra)]
            for slot in grant:
                self.owner[slot] = request.channel.id
            request.channel.granted.update(grant)
            self._send_grants(request.channel, grant)

    def _send_grants(self, channel: _Channel, grant: list[int]) -> None:
        try:
            os.write(channel.grant_fd, array("i", grant).tobytes())
        except OSError:  # the producer is gone: its slots come back on retire
            pass

    def _free_slots(self, slots: list[int], channel: _Channel | None = None) -> None:
        if channel is not None:
            channel.granted.difference_update(slots)
        for slot in slots:
            self.owner[slot] = _FREE
        self.free.extend(slots)

    def _settle_slots(self) -> None:
        """Free the slots of frames gathered, then grant and relieve: after every step."""
        self._gather_in_order()
        self._grant_pending()
        self._relieve_ring()

    def _relieve_ring(self) -> None:
        """Copy waiting frames out of the ring when it runs short of free slots.

        Within the reorder budget, frames furthest ahead are copied out until a
        quarter of the slots is free. Beyond it, only as many as the request for
        the lowest frame needs, and only frames after that one, when nothing
        else can free a slot: that keeps the ring moving at the price of memory
        (noted in the log).
        """
        quarter = self.config.ring.slots // 4
        urgent = min(self.pending, key=_Request.frame_of) if self.pending else None
        if len(self.free) >= max(quarter, urgent.wanted if urgent else 0):
            return  # the common case: nothing to relieve
        for arrival in self.reorder.held_in_slots():  # the furthest ahead first
            # worth exceeding the budget for a frame that comes before this one; a
            # request for a frame further ahead waits for the frontier, but not for
            # long: the frame the frontier needs may only be put after this one
            # (or never, if its producer died)
            stuck = urgent is not None and len(self.free) < urgent.wanted and (
                urgent.frame < arrival.frame or self.producer_died or self._everyone_waits()
                or time.monotonic() - urgent.since > _PATIENCE_S)
            if not stuck and len(self.free) >= quarter:
                break
            if not self.reorder.has_room(self._nbytes(arrival.nevents)):
                if not stuck:
                    break
                self._note_budget_exceeded()
            self._copy_out(arrival)
            self.reorder.mark_copied(arrival)
        self._grant_pending()

    def _everyone_waits(self) -> bool:
        """Whether every producer still running waits for slots: none can move the frontier."""
        waiting = {id(request.channel) for request in self.pending}
        return all(id(c) in waiting for c in self.channels.values() if not c.done)

    def _note_budget_exceeded(self) -> None:
        # not a fault: producers a few frames apart, or one that starts late, get
        # here; memory stays bounded by what the producers can put ahead, and
        # statistics() and `shmwriter top` show the stash's peak
        if not self._noted_budget:
            logger.info("frames arrive far out of order: the reorder stash exceeds its budget of "
                        "%d bytes to keep the ring moving", self.config.reorder_budget_nbytes)
            self._noted_budget = True

    # -- frames -----------------------------------------------------------------------
    def _nbytes(self, nevents: int) -> int:
        return nevents * self.config.ring.layout.schema.event_nbytes

    def _parts(self, arrival: Arrival) -> list[tuple[Mapping[str, np.ndarray[Any, Any]], int]]:
        if arrival.arrays is not None:
            return [(arrival.arrays, arrival.nevents)]
        per_slot = self.config.ring.layout.slot_events
        return [(self._slot_views[slot], min(per_slot, arrival.nevents - j * per_slot))
                for j, slot in enumerate(arrival.slots)]

    def _copy_out(self, arrival: Arrival) -> None:
        """Copy a frame's events out of its slots into private memory; free the slots."""
        arrays = {}
        for name, feature in self.config.ring.layout.schema.items():
            arrays[name] = np.empty((arrival.nevents, *feature.shape), feature.file_dtype)
            start = 0
            for source, count in self._parts(arrival):
                arrays[name][start:start + count] = source[name][:count]
                start += count
        self._free_slots(arrival.slots)
        arrival.slots, arrival.arrays = [], arrays
        arrival.nbytes = self._nbytes(arrival.nevents)

    def _gather(self, arrival: Arrival) -> None:
        """Append the frame at the frontier to the chunk (batched while it is in slots)."""
        if arrival.arrays is None:
            self._in_order.append((arrival.frame, arrival.nevents, arrival.slots))
        else:
            self._gather_in_order()
            self.gatherer.append(arrival.frame, arrival.nevents, self._parts(arrival))
        if self.gatherer.nframes + len(self._in_order) >= self.config.write_threshold:
            self._emit()

    def _gather_in_order(self) -> None:
        """Copy the batch of in-order frames out of their slots and free the slots.

        Runs after every read from a producer, so a slot waits at most for the
        records of one read to be handled.
        """
        if self._in_order:
            batch, self._in_order = self._in_order, []
            self.gatherer.append_from_ring(batch, self._feature_views)
            self._free_slots([slot for _, _, slots in batch for slot in slots])

    def _drain(self) -> None:
        while (arrival := self.reorder.pop_next()) is not None:
            self._gather(arrival)

    def _skip_missing(self, frame: int) -> None:
        """Declare the frames from the frontier up to ``frame`` missing (one range)."""
        skipped = self.reorder.skip_to(frame)
        if skipped:
            self._gather_in_order()  # the frames before the gap come first
            self.gatherer.skip(len(skipped))  # a gap adds no events: one chunk covers it
            if self.gatherer.nframes >= self.config.write_threshold:
                self._emit()

    # -- chunks and the sink thread ------------------------------------------------------
    def _emit(self) -> None:
        self._gather_in_order()
        self._last_emit = time.monotonic()
        if self.gatherer.nframes:
            self._put_chunk(self.gatherer.take(), wait_for_sink=True)

    def _put_chunk(self, chunk: Chunk | None, *, wait_for_sink: bool) -> None:
        while True:
            if wait_for_sink:
                self._raise_if_sink_failed()
            try:
                self.chunks.put(chunk, timeout=0.25)
                break
            except queue.Full:
                if self.sink_error is not None and not wait_for_sink:
                    self._discard_chunks()
        if self.ring is not None:
            self.ring.set(Field.WRITE_QUEUE_SIZE, self.chunks.qsize())

    def _discard_chunks(self) -> None:
        while True:
            try:
                self.chunks.get_nowait()
            except queue.Empty:
                return

    def _write_chunks(self) -> None:
        """Sink thread: write chunks in order until None arrives or writing fails."""
        ring, sink = self.ring, self.sink
        assert ring is not None and sink is not None
        while (chunk := self.chunks.get()) is not None:
            if self.sink_error is not None:
                continue  # keep taking chunks so the loop never blocks on a dead sink
            try:
                sink.write(chunk)
            except BaseException as exc:
                logger.error("writing %s failed: %s", sink.path, exc)
                self.sink_error = exc
                continue
            ring.header[Field.WRITTEN_EVENTS] += chunk.nevents
            ring.header[Field.WRITTEN_FRAMES] += chunk.nframes - chunk.nmissing
            ring.header[Field.WRITTEN_NBYTES] += chunk.nbytes
            ring.set(Field.WRITE_QUEUE_SIZE, self.chunks.qsize())

    def _raise_if_sink_failed(self) -> None:
        if self.sink_error is not None:
            raise OSError(f"writing {self.config.path} failed: {self.sink_error}") \
                from self.sink_error

    def _publish(self) -> None:
        """Refresh the header figures that ``statistics()`` and ``shmwriter top`` read."""
        ring = self.ring
        if ring is None or ring.closed:
            return
        in_use = self.config.ring.slots - len(self.free)
        header = ring.header
        header[Field.SLOTS_IN_USE] = in_use
        header[Field.PEAK_SLOTS_IN_USE] = max(in_use, int(header[Field.PEAK_SLOTS_IN_USE]))
        header[Field.FRAMES_DONE] = self.reorder.frontier
        header[Field.NEWEST_FRAME] = self.reorder.newest
        header[Field.MISSING_FRAMES] = len(self.reorder.missing)
        header[Field.STASH_NBYTES] = self.reorder.stash_nbytes
        header[Field.PEAK_STASH_NBYTES] = self.reorder.peak_stash_nbytes
        header[Field.REJECTED_FRAMES] = self.rejected
        header[Field.PRODUCERS_ALIVE] = sum(not c.done for c in self.channels.values())
        header[Field.UPDATE_TIME_NS] = time.time_ns()


def serve(loop: WriterLoop) -> None:
    """Run a whole run and send its result back over the loop's control socket."""
    control = loop.control
    result = loop.run()
    try:
        _drain_control(control)
        control.send(MSG_RESULT + zlib.compress(pickle.dumps(result)))
    except OSError:
        logger.error("the controlling process is gone; the run ended %s", result.state.name)
    finally:
        control.close()


def _drain_control(control: socket.socket) -> None:
    """Read what the Writer sent and the loop did not need.

    Closing a unix socket with unread data makes the peer's next read fail
    with ECONNRESET, which would hide the result sent after it.
    """
    control.setblocking(False)
    while True:
        try:
            if not control.recv(MESSAGE_NBYTES):
                return
        except (BlockingIOError, ConnectionError):
            return


def run_in_process(config: RunConfig, control: socket.socket) -> None:
    """Entry point of a writer process (started with the ``spawn`` context).

    Its log records go to the Writer's process, which hands them to its own
    ``logging`` handlers. It ignores SIGINT: Ctrl-C in a terminal reaches the
    whole process group, and the owner decides how the run ends (leaving the
    ``with`` block aborts it). SIGTERM aborts the run the same way: what was
    sent is written and the file is closed. The Writer starts this process
    with both signals blocked, so neither can strike before this is set up.
    """
    package_logger = logging.getLogger("shmwriter")
    package_logger.setLevel(config.log_level)
    package_logger.addHandler(_ForwardingHandler(control))
    package_logger.propagate = False
    loop = WriterLoop(config, control)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: loop.request_abort("the writer got SIGTERM"))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    serve(loop)


def _fit(line: str) -> str:
    """``line`` cut to dclab's log line limit (counted in bytes, so it also fits the block)."""
    raw = line.encode("utf-8")
    if len(raw) <= LOG_LINE_LIMIT:
        return line
    return raw[:LOG_LINE_LIMIT - 3].decode("utf-8", "ignore") + "..."


def describe_failure(exc: BaseException) -> str:
    """One line naming what went wrong, the errno's text first (HDF5's messages bury it)."""
    text = " ".join(str(exc).split())
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code > 0:
        return f"{os.strerror(code)} ({type(exc).__name__}: {text})"
    return f"{type(exc).__name__}: {text}"


class _ForwardingHandler(logging.Handler):
    """Sends log records over the control socket; never blocks the writer."""

    def __init__(self, control: socket.socket) -> None:
        super().__init__()
        self._control = control

    def emit(self, record: logging.LogRecord) -> None:
        fields = dict(record.__dict__)
        fields["msg"], fields["args"] = record.getMessage(), None
        if record.exc_info:
            fields["exc_text"] = logging.Formatter().formatException(record.exc_info)
        fields["exc_info"] = None
        try:
            self._control.send(MSG_LOG + pickle.dumps(fields), socket.MSG_DONTWAIT)
        except (OSError, pickle.PicklingError):
            pass  # the Writer's process is gone or not reading: drop, never block
