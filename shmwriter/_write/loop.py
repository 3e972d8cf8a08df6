"""The writer loop: it reads what producers and the Writer send and passes it to the rooms.

One thread runs :class:`WriterLoop` (in a writer process of its own or in a
thread of the owner's, see :mod:`._entry`). It owns no policy of its own; it
passes events between the rooms that do:

* the producers' channels (this module): records in, slot grants out, liveness;
* :class:`~._slots.SlotAllocator`: who owns each slot;
* :class:`~._assemble.FrameAssembler`: frame order, gathering, slots back;
* :class:`~._sinkthread.SinkThread` with :class:`~._h5sink.H5Sink`: chunks to the file;
* the control socket to the Writer (:mod:`._control`) and the attach socket
  (:mod:`._attach`), which hands each producer its own pipes.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import time

from .._channel.attach import AttachServer
from .._channel.control import MESSAGE_NBYTES, MSG_ABORT, MSG_HANDOUT_OVER, MSG_STARTED
from .._channel.records import GRANT_NONE, GRANT_REFUSED, Kind, Record
from .._liveness import is_alive
from .._ranges import FrameRanges
from .._ring.ring import SlotRing, State
from .._rtdc import RUN_LOG
from .assemble import FrameAssembler
from .channels import Channels, ProducerChannel
from .gather import Chunk
from .h5sink import H5Sink
from .header import RunHeader
from .intake import FrameIntake
from .run import RunConfig, RunResult, describe_failure, run_log_lines
from .sink_thread import SinkThread
from .slots import SlotAllocator, SlotRequest

__all__ = ["WriterLoop"]

logger = logging.getLogger(__name__)

_LIVENESS_INTERVAL_S = 0.5
#: How long a request for a frame ahead of the waiting ones may wait before the writer
#: copies waiting frames out of the ring for it, beyond the reorder budget if need be.
_PATIENCE_S = 0.5
#: How long the frontier may stand still before its producer counts as slow: then the
#: others may take the whole ring (and the stash), no room being kept for it.
_STALL_S = 0.1
#: One chunk waits while one is written: bounded memory. With the one being gathered, that
#: makes the three sets of columns ChunkGatherer keeps for reuse (its ``column_sets``).
_CHUNK_QUEUE_SIZE = 1
#: The kinds that ask for slots; those asking for consecutive ones; those answered at once.
_REQUESTS = frozenset({Kind.REQUEST, Kind.REQUEST_RUN, Kind.REQUEST_NOW, Kind.REQUEST_RUN_NOW})
_RUN_REQUESTS = frozenset({Kind.REQUEST_RUN, Kind.REQUEST_RUN_NOW})
_NOW_REQUESTS = frozenset({Kind.REQUEST_NOW, Kind.REQUEST_RUN_NOW})


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
        self.ring: SlotRing | None = None
        self.header: RunHeader | None = None
        self.slots = SlotAllocator(config.ring.slots, config.prefetch)
        self.frames: FrameAssembler | None = None
        self.sink: H5Sink | None = None
        self.sink_thread: SinkThread[Chunk] | None = None
        self.attach_server: AttachServer | None = None
        self.selector = selectors.DefaultSelector()
        self.channels = Channels(self.selector)
        self.handout_over = self.producer_died = self.stopping = False
        #: Why the run is aborted; None while it is not.
        self.abort_reason: str | None = None
        self.intake: FrameIntake | None = None
        self.written_frames = 0
        #: What made the run fail, in one line (the errno's text first), or None.
        self.failure: str | None = None
        self._last_flush = time.monotonic()
        self._close_cpu_ns = 0
        self._frontier_seen, self._frontier_moved = -1, time.monotonic()

    # -- lifecycle --------------------------------------------------------------
    def run(self) -> RunResult:
        """Serve the run to its end and return how it ended (never raises)."""
        started_ns = time.thread_time_ns()
        state, error = State.DONE, None
        try:
            self._start()
            self._serve()
            aborted = self.abort_reason is not None
            self._finish_frames(aborted)
            state = State.ABORTED if aborted else State.DONE
        except BaseException as exc:
            logger.error("the writer failed: %s", exc)
            logger.debug("where the writer failed", exc_info=True)
            sink_error = self.sink_thread.error if self.sink_thread else None
            self.failure = describe_failure(sink_error or exc)
            where = f"writing {self.config.path} failed: " if sink_error else ""
            state, error = State.FAILED, f"{where}{self.failure}"
        finally:
            state, error = self._shut_down(state, error)
        if state is State.ABORTED:
            error = self.abort_reason
        return RunResult(state=state, written_events=self.sink.nevents if self.sink else 0,
                         written_frames=self.written_frames, missing_frames=self._missing(),
                         rejected_frames=self._rejected(), error=error,
                         stage_cpu_s=self._stage_cpu_s(time.thread_time_ns() - started_ns))

    def request_abort(self, reason: str) -> None:
        """End the run soon: take what was sent, write it, close the file (signal-safe)."""
        if self.abort_reason is None:
            self.abort_reason = reason

    def _start(self) -> None:
        config = self.config
        ring = self.ring = SlotRing.attach(config.ring)
        header = self.header = RunHeader(ring)
        header.started()
        sink = self.sink = H5Sink(config.path, config.ring.layout.schema, config.derived,
                                  config.hdf5_dataset_kwargs, config.metadata)
        self.frames = FrameAssembler(
            ring, self.slots, write_threshold=config.write_threshold, derived=config.derived,
            layouts=sink.layouts, reorder_budget_nbytes=config.reorder_budget_nbytes,
            emit=self._emit)
        self.sink_thread = SinkThread(
            sink.write, where=config.path, queue_size=_CHUNK_QUEUE_SIZE,
            on_written=self._written, on_queue_size=header.set_write_queue_size)
        self.sink_thread.start()
        self.intake = FrameIntake(config.ring, self.slots, self.frames, self._refuse)
        self.attach_server = AttachServer(config.ticket.address, config.ticket.secret)
        header.set_state(State.RUNNING)
        self.control.send(MSG_STARTED)

    def _serve(self) -> None:
        self.selector.register(self.control, selectors.EVENT_READ, None)
        assert self.attach_server is not None and self.sink_thread is not None
        self.selector.register(self.attach_server.wakeup_fd, selectors.EVENT_READ,
                               self.attach_server)
        next_liveness = time.monotonic() + _LIVENESS_INTERVAL_S
        while not self._run_complete():
            timeout = min(next_liveness, self._last_flush + self.config.flush_interval_s)
            if self.slots.pending:  # a request held back waits for the frontier to stall
                timeout = min(timeout, time.monotonic() + _STALL_S)
            for key, _ in self.selector.select(max(0.0, timeout - time.monotonic())):
                if key.data is None:
                    self._on_control()
                elif key.data is self.attach_server:
                    self.channels.add(self.attach_server.take())
                else:
                    self._on_readable(key.data)
            self.sink_thread.raise_if_failed()
            now = time.monotonic()
            if now >= next_liveness:
                self._check_liveness()
                next_liveness = now + _LIVENESS_INTERVAL_S
            if now - self._last_flush >= self.config.flush_interval_s:
                self._flush()
            self._settle_slots()
            self._publish()

    def _run_complete(self) -> bool:
        if self.abort_reason is not None:
            return True
        total = self.config.ring.total_frames
        if total is not None and self._frames().reorder.frontier >= total:
            return True
        return self.handout_over and not self.channels.any_open()

    def _finish_frames(self, aborted: bool) -> None:
        """Write every frame received, declaring the gaps between them missing.

        A run that ends normally also declares the frames after the last one
        received missing (up to ``total_frames``); an aborted run does not: it
        never reached them.
        """
        frames = self._frames()
        self._stop_attaching()
        if aborted:
            self._take_what_was_sent()
        while (lowest := frames.reorder.lowest_waiting()) is not None:
            frames.skip_missing(lowest)
            frames.drain()
        if not aborted:
            frames.skip_missing(frames.reorder.end())
        self._flush()
        missing = frames.reorder.missing
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
        self._header().set_state(State.ABORTING, f"the run was aborted: {self.abort_reason}")
        self.stopping = True
        self.slots.drop_pending()
        for channel in self.channels:
            while not channel.done and self._on_readable(channel):
                pass

    def _shut_down(self, state: State, error: str | None) -> tuple[State, str | None]:
        # producers whose channel closes from here on read the header to learn why
        self._announce(state, error)
        self._stop_attaching()
        for channel in self.channels:
            self._retire(channel, "the run ended")
        if self.sink_thread is not None:
            self.sink_thread.finish()
            if self.sink_thread.error is not None and state is not State.FAILED:
                logger.error("writing %s failed: %s", self.config.path, self.sink_thread.error)
                state = State.FAILED
                self.failure = describe_failure(self.sink_thread.error)
                error = f"writing {self.config.path} failed: {self.failure}"
                self._announce(state, error)
        if self.sink is not None:
            started = time.thread_time_ns()
            state, error = self._close_sink(self.sink, state, error)
            self._close_cpu_ns = time.thread_time_ns() - started
        if self.header is not None:
            self._publish()
            self.written_frames = self.header.written_frames
            self.header.set_state(state, error)
        if self.frames is not None:
            self.frames.release_views()
        if self.ring is not None:
            self.ring.close()
        self.selector.close()
        return state, error

    def _close_sink(self, sink: H5Sink, state: State,
                    error: str | None) -> tuple[State, str | None]:
        if state is State.FAILED:
            sink.abandon(run_log=self._run_log(state, error))
            return state, error
        try:
            logs = {**self.config.logs, RUN_LOG: self._run_log(state, error)}
            sink.close(missing_frames=self._missing(), logs=logs)
        except Exception as exc:
            logger.exception("closing %s failed", self.config.path)
            self.failure = describe_failure(exc)
            state = State.FAILED
            error = f"closing {self.config.path} failed: {self.failure}"
            sink.record_failure(self._run_log(state, error))
        return state, error

    def _announce(self, state: State, error: str | None) -> None:
        if self.header is not None:
            self.header.announce_end(state, error)

    def _run_log(self, state: State, error: str | None) -> list[str]:
        frames_done = self.frames.reorder.frontier if self.frames else 0
        return run_log_lines(
            state=state, total_frames=self.config.ring.total_frames, frames_done=frames_done,
            written_frames=self.header.written_frames if self.header else 0,
            missing_frames=len(self._missing()), rejected_frames=self._rejected(),
            reason=self.abort_reason, error=self.failure or error)

    def _stage_cpu_s(self, loop_ns: int) -> dict[str, float]:
        """CPU seconds per stage: this thread's own work, the copies, HDF5, the encoders."""
        gather_ns = self.frames.gather_cpu_ns if self.frames else 0
        write_ns = (self.sink.write_cpu_ns + self._close_cpu_ns) if self.sink else 0
        encode_ns = self.sink.encode_cpu_ns if self.sink else 0
        own_ns = max(0, loop_ns - gather_ns - self._close_cpu_ns)
        return {"descriptors": own_ns / 1e9, "gather": gather_ns / 1e9,
                "hdf5": write_ns / 1e9, "encode": encode_ns / 1e9}

    def _rejected(self) -> int:
        return self.intake.rejected if self.intake else 0

    def _intake(self) -> FrameIntake:
        assert self.intake is not None, "frames are taken once the run has started"
        return self.intake

    def _missing(self) -> FrameRanges:
        return self.frames.reorder.missing if self.frames else FrameRanges()

    def _header(self) -> RunHeader:
        assert self.header is not None, "the ring is mapped once the run has started"
        return self.header

    def _frames(self) -> FrameAssembler:
        assert self.frames is not None, "frames are assembled once the run has started"
        return self.frames

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
                self.channels.add(self.attach_server.close_to_new())
        elif kind == MSG_ABORT:
            self.request_abort(message[1:].decode("utf-8", "replace") or "aborted by the owner")

    # -- attaching ------------------------------------------------------------------
    def _stop_attaching(self) -> None:
        """Close the attach socket: a ticket used from now on finds the run ended.

        Channels attached until now are taken: what their producers send still counts.
        """
        if self.attach_server is not None:
            server, self.attach_server = self.attach_server, None
            with contextlib.suppress(KeyError):  # registered only once serving began
                self.selector.unregister(server.wakeup_fd)
            self.channels.add(server.close_to_new())
            server.close()

    # -- producers ----------------------------------------------------------------
    def _on_readable(self, channel: ProducerChannel) -> bool:
        """Read and handle what the producer sent; False once nothing more is waiting."""
        received = self.channels.read(channel)
        if received is None:  # every copy of its pipe end is closed: no CLOSE came first
            if channel.pid:  # a process used it: it died (or dropped it unclosed)
                logger.warning("producer %d (pid %d) went away without closing; taking back "
                               "its %d slot(s)", channel.id, channel.pid,
                               len(self.slots.granted_to(channel.id)))
                self.producer_died = True
            self._retire(channel, "closed its end")
            return False
        records, nbytes = received
        if not nbytes:
            return False
        self._header().count_received(nbytes)
        for record in records:
            if channel.done:
                break
            self._on_record(channel, record)
        self._settle_slots()
        return not channel.done

    def _on_record(self, channel: ProducerChannel, record: Record) -> None:
        kind = record.kind
        intake = self._intake()
        if kind == Kind.FRAME:
            intake.frame(channel, record)
        elif kind in _REQUESTS:
            self._on_request(channel, record)
        elif kind == Kind.CANCEL:  # withdraw the request outstanding; NOTHING answers it
            self.slots.withdraw(channel.id)
            self.channels.send(channel, [GRANT_NONE])
        elif kind == Kind.PACKED:
            intake.packed(channel, record)
        elif kind == Kind.RELEASE:
            self.slots.release(channel.id, list(record.slots))
        elif kind == Kind.HELLO:
            self._on_hello(channel, record.value)
        elif kind == Kind.CLOSE:
            self._retire(channel, "closed")
        elif kind == Kind.MALFORMED:
            self._refuse(channel, "sent a record larger than one write can be (forged?)")
        else:
            self._refuse(channel, f"sent a record of unknown kind {kind}")

    def _on_request(self, channel: ProducerChannel, record: Record) -> None:
        """REQUEST, REQUEST_RUN, or their "now" forms (granted at once, or NOTHING at once)."""
        kind, wanted = record.kind, record.nevents
        run, now = kind in _RUN_REQUESTS, kind in _NOW_REQUESTS
        # a run is at most half the ring (Producer.frames asks for no more)
        most = max(1, self.config.ring.slots // 2) if run else self.config.ring.slots
        if not 1 <= wanted <= most:
            self._refuse(channel, f"asked for {wanted} slots")
            return
        if not self._intake().in_range(record.value):
            self._refuse(channel, f"asked for slots for frame {record.value}, out of range")
            return
        request = SlotRequest(record.value, channel.id, wanted, contiguous=run)
        if now and (self.stopping or not self._can_grant_now(request)):
            self.channels.send(channel, [GRANT_NONE])
        elif not self.stopping:
            self.slots.request(request)
            if now:  # granted at once (can_grant_now said so), before anything read later
                self._grant_pending()  # can queue ahead of it

    def _can_grant_now(self, request: SlotRequest) -> bool:
        """Whether a request answered at once can be granted, frames being copied out of
        the ring for it now if need be: it never waits in line, so it is the only chance."""
        if not self.slots.can_serve(request):
            self._frames().relieve(request, desperate=False)
        return self.slots.can_grant_now(request, frontier=self._kept_room_frontier())

    def _on_hello(self, channel: ProducerChannel, pid: int) -> None:
        if channel.pid and channel.pid != pid and is_alive(channel.pid):
            self._refuse(channel, f"is used by two processes at once (pids {channel.pid} and "
                                  f"{pid}); give each process its own Writer.producer()")
            return
        channel.pid = pid
        self._header().count_producer()

    def _refuse(self, channel: ProducerChannel, why: str) -> None:
        logger.error("producer %d %s; refusing it", channel.id, why)
        self._header().note_error(f"producer {channel.id} {why}")
        self.channels.send(channel, [GRANT_REFUSED])
        self._retire(channel, "was refused")

    def _retire(self, channel: ProducerChannel, why: str) -> None:
        """Forget a producer: take back its slots and close its pipes."""
        if self.channels.retire(channel):
            logger.debug("producer %d %s", channel.id, why)
            self.slots.retire(channel.id)
            self._grant_pending()

    def _check_liveness(self) -> None:
        for channel in self.channels.dead():
            if not channel.done:
                while self._on_readable(channel):
                    pass  # what it sent before it died is valid: take all of it
                if channel.done:
                    continue
                logger.warning("producer %d (pid %d) died; taking back its %d slot(s)",
                               channel.id, channel.pid, len(self.slots.granted_to(channel.id)))
                self.producer_died = True
                self._retire(channel, "died")
        frames = self._frames()
        if self.producer_died and not frames.reorder.has_room(0):
            # a dead producer's frames will never come: stop waiting for them
            lowest = frames.reorder.lowest_waiting()
            if lowest is not None and lowest > frames.reorder.frontier:
                frames.skip_missing(lowest)
                frames.drain()

    # -- slots ----------------------------------------------------------------------
    def _grant_pending(self, *, hold_back: bool = True) -> None:
        """Send the grants the allocator can make; with ``hold_back``, requests for frames
        after the frontier leave room for the frontier's (see ``grant_pending``)."""
        if self.stopping:
            return
        frontier = self._kept_room_frontier() if hold_back else None
        for grant in self.slots.grant_pending(frontier=frontier):
            self.channels.send(self.channels[grant.producer], grant.slots)

    def _settle_slots(self) -> None:
        """Free the slots of frames gathered, then grant and relieve: after every step."""
        if self.frames is None:
            return
        self.frames.settle()
        if (urgent := self.slots.urgent()) is not None:
            self._grant_pending(hold_back=not self._desperate(urgent))
        urgent = self.slots.urgent()
        desperate = (urgent is not None and not self.slots.can_serve(urgent)
                     and self._desperate(urgent))
        self.frames.relieve(urgent, desperate=desperate)
        self._grant_pending(hold_back=not desperate)

    def _kept_room_frontier(self) -> int | None:
        """The frontier whose producer gets room kept in the ring (see ``grant_pending``),
        or None once it stood still for ``_STALL_S``: then its producer is slow, and the
        others may take the whole ring."""
        if self.frames is None:
            return None
        frontier, now = self.frames.reorder.frontier, time.monotonic()
        if frontier != self._frontier_seen:
            self._frontier_seen, self._frontier_moved = frontier, now
        return None if now - self._frontier_moved > _STALL_S else frontier

    def _desperate(self, urgent: SlotRequest) -> bool:
        """Whether the ring must serve ``urgent`` at any price: a producer died, every
        producer waits, or the request waited too long."""
        # cheapest first: this runs after every step while a request waits
        return (self.producer_died or time.monotonic() - urgent.since > _PATIENCE_S
                or self.slots.everyone_waits(self.channels.open_ids()))

    # -- chunks ----------------------------------------------------------------------
    def _flush(self) -> None:
        self._last_flush = time.monotonic()
        self._frames().flush()

    def _emit(self, chunk: Chunk) -> None:
        """The assembler's chunk goes to the sink thread (waiting while the disk is behind)."""
        self._last_flush = time.monotonic()
        assert self.sink_thread is not None
        self.sink_thread.put(chunk)

    def _written(self, chunk: Chunk) -> None:
        """A chunk is in the file (in the sink thread): count it; its columns come back."""
        self._header().count_written(chunk)
        self._frames().gatherer.recycle(chunk)

    def _publish(self) -> None:
        if self.header is not None and self.frames is not None:
            self.header.publish(slots_in_use=self.slots.in_use, reorder=self.frames.reorder,
                                rejected=self._rejected(),
                                producers_alive=len(self.channels.open_ids()))
