"""The Writer: owns a run's ring, starts the writer loop, hands out producers."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import queue
import signal
import socket
import threading
import time
import zlib
from collections.abc import Mapping
from typing import Any, Literal

from ._channel.attach import Ticket, new_ticket, open_channel
from ._channel.control import MSG_HANDOUT_OVER, MSG_LOG, MSG_RESULT, MSG_STARTED, abort_message
from ._forks import close_in_forked_children
from ._ranges import FrameRanges
from ._ring.ring import Field, SlotRing, State
from ._ring.stats import RunStatistics, read_statistics
from ._spec import Schema, SlotLayout
from ._write.entry import run_in_process, serve
from ._write.loop import WriterLoop
from ._write.recover import make_readable
from ._write.run import (
    RunConfig,
    RunResult,
    check_directory,
    check_run_args,
    default_reorder_budget,
    derived_features,
    ring_slots,
)
from .errors import BrokenError, ClosedError, MissingFramesError
from .producer import Producer

__all__ = ["Writer"]

logger = logging.getLogger(__name__)

#: The ring a Writer gets unless told otherwise: slots, and events per slot.
DEFAULT_SLOTS, DEFAULT_SLOT_EVENTS = 64, 4
_START_TIMEOUT_S = 120.0
_ABORT_TIMEOUT_S = 60.0
_CONTROL_BUFFER_NBYTES = 8 * 2**20


class Writer:
    """Writes frames from many producer processes into one .rtdc (HDF5) file.

    Producers copy each frame's events into slots of a shared-memory ring and
    send a small descriptor; the writer puts frames into frame order, gathers
    ``write_threshold`` frames into a chunk and appends it to the file.

    Parameters
    ----------
    path
        The .rtdc file to create (replaced if it exists).
    schema
        The features of every event.
    total_frames
        Frames of the run (indices ``0 .. total_frames - 1``). None for an
        open-ended run, which ends when every producer handed out has closed
        or died.
    slots, slot_events
        The ring has ``slots`` slots of ``slot_events`` events each; a frame
        with more events spans several slots.
    memory_budget_nbytes
        Size the ring by bytes instead: as many slots as fit, at most 16000
        (overrides ``slots``).
    write_threshold
        Frames gathered into one chunk before it is written.
    hdf5_dataset_kwargs
        Overrides of the dataset keywords (default Zstd level 5 and
        fletcher32), e.g. ``{"compression": None}``.
    metadata
        ``{"section:key": value}`` root attributes; ``experiment:event count``
        is set when the run closes.
    flush_interval_s
        Longest time a gathered frame waits before it reaches the file.
    mode
        ``"process"`` (the default) runs the writer in a spawned process of
        its own: it has a core and a GIL to itself, and if either this
        process or the writer process is killed, the other one leaves the
        file closed and readable by any HDF5 reader. ``"thread"`` runs it in a
        thread of this process: quicker to start, but if this process is
        killed the file is left marked open for writing (its data is intact;
        readers open it with ``h5py.File(path, "r", swmr=True)``, as dclab does).
    timeout_s
        How long a producer waits for a free slot before it raises
        :class:`~shmwriter.RingFullError`.
    allow_gaps
        If False, :meth:`close` raises :class:`~shmwriter.MissingFramesError`
        when frames never arrived (they are recorded in the file either way).
    index_feature
        Name of the per-event frame index the writer adds: ``"frame"``
        (skipped if the schema has its own), ``"index_unmapped"`` as dcnum
        names it, or None.
    reorder_budget_nbytes
        Most bytes of out-of-order frames the writer copies out of the ring
        (default: the ring's size). Frames waiting for an earlier one stay in
        their slots while the ring can serve the request for the lowest frame;
        the budget is exceeded (logged at INFO level) only when frames arrive
        so far out of order that the ring would otherwise stall.
    logs
        ``{name: lines}`` added under ``/logs`` when the run closes.

    Raises
    ------
    ShmSpaceError
        If /dev/shm or memory cannot hold the ring.
    BrokenError
        If the writer could not start (for example the file cannot be created).

    Notes
    -----
    The Writer owns the ring: :meth:`close` (or leaving the ``with`` block)
    waits for the run to end, closes the file and unlinks the ring. If the
    block raises (Ctrl-C included), the run is aborted: every frame whose
    ``put()`` returned is written or, if an earlier frame never came, listed
    in :attr:`missing_frames`, and the file is closed valid; its run log says
    why it ended. The same holds when the owner dies or the writer process
    gets SIGTERM; the writer process ignores SIGINT, so a Ctrl-C in a terminal
    (which reaches the whole process group) ends the run the way the owner
    decides. If the owner dies, the ring is unlinked by
    ``multiprocessing``'s resource tracker; ``shmwriter clean`` removes what
    is left of runs whose owner is dead.
    """

    _ring: SlotRing | None = None
    _control: socket.socket | None = None
    _result: RunResult | None = None
    _closed = False

    def __init__(self, path: str | os.PathLike[str], schema: Schema, *,
                 total_frames: int | None = None, slots: int = DEFAULT_SLOTS,
                 slot_events: int = DEFAULT_SLOT_EVENTS,
                 memory_budget_nbytes: int | None = None, write_threshold: int = 500,
                 hdf5_dataset_kwargs: Mapping[str, Any] | None = None,
                 metadata: Mapping[str, Any] | None = None, flush_interval_s: float = 1.0,
                 mode: Literal["thread", "process"] = "process", timeout_s: float = 30.0,
                 allow_gaps: bool = False, index_feature: str | None = "frame",
                 reorder_budget_nbytes: int | None = None,
                 logs: Mapping[str, list[str]] | None = None) -> None:
        layout = SlotLayout(schema=schema, slot_events=slot_events)
        slots = ring_slots(slots, memory_budget_nbytes, layout)
        check_run_args(total_frames, write_threshold, flush_interval_s, mode, timeout_s)
        self.path = os.fspath(path)
        check_directory(self.path)
        # what was at the path before the writer started: never ours to repair
        self._path_before = _file_identity(self.path)
        self._writer_started = False  # it said so: the file at the path is its own
        self.schema, self.mode, self.allow_gaps = schema, mode, allow_gaps
        self._timeout_s = float(timeout_s)
        self._producers: list[Producer] = []
        self._worker: threading.Thread | multiprocessing.process.BaseProcess | None = None
        self._ring = SlotRing.create(layout, slots, total_frames)
        try:
            self._ring.set(Field.OWNER_PID, os.getpid())
            self._ring.set_path_text(os.path.abspath(self.path))
            self._ticket = new_ticket(self._ring.spec, self._timeout_s)
            config = RunConfig(
                path=self.path, ring=self._ring.spec, ticket=self._ticket,
                write_threshold=int(write_threshold),
                flush_interval_s=float(flush_interval_s),
                hdf5_dataset_kwargs=dict(hdf5_dataset_kwargs or {}) or None,
                metadata=dict(metadata or {}), derived=derived_features(schema, index_feature),
                reorder_budget_nbytes=(reorder_budget_nbytes
                                       or default_reorder_budget(self._ring.spec)),
                prefetch=min(32, slots // 4), logs=dict(logs or {}),
                log_level=logging.getLogger("shmwriter").getEffectiveLevel())
            self._start(config)
        except BaseException as exc:  # a Ctrl-C while starting, say: the writer must stop too
            self._send(abort_message(_abort_reason(type(exc))))
            self._clean_up()
            raise

    def _close_after_fork(self) -> None:
        """In a forked child: close the copy of the control socket (the run is not its)."""
        control, self._control = self._control, None
        if control is not None:
            control.close()

    # -- start ----------------------------------------------------------------------
    def _start(self, config: RunConfig) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for sock in (ours, theirs):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _CONTROL_BUFFER_NBYTES)
        self._control = ours
        close_in_forked_children(self)  # a forked child must not hide this process's death
        self._messages: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=_read_control, args=(ours, self._messages),
                         name="shmwriter-control", daemon=True).start()
        if self.mode == "process":
            ctx = multiprocessing.get_context("spawn")
            self._worker = ctx.Process(target=run_in_process, args=(config, theirs),
                                       name="shmwriter-writer", daemon=True)
            # the child inherits the blocked signals and unblocks them once it has
            # set its own handling: a Ctrl-C during its start cannot kill it
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _OWNER_DECIDES)
            try:
                self._worker.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            theirs.close()
        else:
            self._worker = threading.Thread(target=serve, args=(WriterLoop(config, theirs),),
                                            name="shmwriter-writer", daemon=True)
            self._worker.start()
        message = self._receive(_START_TIMEOUT_S)
        if message != MSG_STARTED:
            result = self._parse_result(message)
            raise BrokenError(f"the writer could not start: {result.error}")
        self._writer_started = True

    # -- public API -------------------------------------------------------------------
    def producer(self) -> Producer:
        """A new producer endpoint; give each worker process its own.

        Pass it to a ``multiprocessing`` child as a ``Process`` argument: the child
        inherits its pipes. Pickled any other way (a Ray or Dask task, a queue),
        it attaches anew where it is unpickled, as :func:`shmwriter.attach` does.

        Raises
        ------
        ClosedError
            If the writer was closed.
        BrokenError
            If the writer is gone.
        """
        self._check_open()
        try:
            producer = open_channel(self._ticket)
        except ClosedError as exc:
            raise BrokenError(f"the writer is gone; no producer can be added: {exc}") from exc
        self._producers.append(producer)
        return producer

    def ticket(self) -> Ticket:
        """What any process of this user on this host needs to attach a producer.

        The ticket is a small picklable value without file descriptors: hand it
        to a script started by hand, by ``subprocess`` or by a scheduler, or to
        a Ray or Dask worker, which turns it into a :class:`~shmwriter.Producer`
        with :func:`shmwriter.attach`. That producer's pipes live only in its
        process, so the writer notices at once if the process dies. An open-ended
        run ends when every attached producer has closed, after :meth:`close`.

        Raises
        ------
        ClosedError
            If the writer was closed.
        """
        self._check_open()
        return self._ticket

    def close(self, timeout_s: float | None = None) -> None:
        """End the run: wait until every frame is written (or every producer is done).

        Parameters
        ----------
        timeout_s
            Longest wait; None waits as long as producers are alive.

        Raises
        ------
        MissingFramesError
            If frames never arrived and ``allow_gaps`` is False (the file is
            complete otherwise).
        BrokenError
            If the writer failed (for example the disk is full), or the run was
            aborted from elsewhere (the writer process got SIGTERM); what was
            flushed before stays readable.
        TimeoutError
            If ``timeout_s`` passed; the run was aborted.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._send(MSG_HANDOUT_OVER)
            self._close_producers()
            try:
                self._result = self._wait_for_result(timeout_s)
            except TimeoutError:
                self._result = self._abort_and_wait(f"close() timed out after {timeout_s} s")
                raise TimeoutError(f"the run did not end within {timeout_s} s; it was "
                                   f"aborted after {self._result.written_frames} frames") from None
            except BaseException as exc:  # Ctrl-C while waiting: abort, keep the file valid
                self._result = self._abort_and_wait(_abort_reason(type(exc)))
                raise
        finally:
            self._clean_up()
        self._raise_for_result(self._result)

    def abort(self) -> None:
        """Stop the run now: write what was sent, close the file, free the ring.

        Every frame whose ``put()`` returned is in the file, or listed in
        :attr:`missing_frames` when an earlier frame never came; frames after
        the newest one received are not (the run never reached them). A
        ``put()`` that is sending while the run aborts raises
        :class:`~shmwriter.BrokenError`.
        """
        self._abort("aborted by Writer.abort()")

    def _abort(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._close_producers()
            self._result = self._abort_and_wait(reason)
        finally:
            self._clean_up()

    def _abort_and_wait(self, reason: str) -> RunResult:
        self._send(abort_message(reason))
        return self._wait_for_result(_ABORT_TIMEOUT_S)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self._abort(_abort_reason(exc_type))
            except Exception:  # the caller's exception matters more
                logger.exception("aborting the run after an error failed")

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("a Writer owns its run and cannot be pickled; pass "
                        "writer.producer() to worker processes instead")

    def __repr__(self) -> str:
        if self._closed:
            state = self._result.state.name if self._result else "CLOSED"
            return f"<Writer {self.path!r} ({state.lower()}, {self.written_events} events)>"
        return (f"<Writer {self.path!r} ({self.mode}, {self.written_frames} frames, "
                f"{self.written_events} events written)>")

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` or :meth:`abort` was called."""
        return self._closed

    @property
    def stage_cpu_s(self) -> dict[str, float]:
        """CPU seconds the writer spent per stage, once the run has ended ({} before).

        ``descriptors``: the writer loop's own work (records, grants, checks,
        reordering); ``gather``: copying events out of the ring into chunks;
        ``hdf5``: HDF5 storing chunks (in the sink thread) and closing the
        file (in the loop's thread); ``encode``: checksums and compression in
        the encoder threads (and, for small HDF5 chunks, in the sink thread).
        """
        return dict(self._result.stage_cpu_s) if self._result else {}

    @property
    def written_events(self) -> int:
        """Events written to the file so far."""
        return self._figure(Field.WRITTEN_EVENTS, "written_events")

    @property
    def written_frames(self) -> int:
        """Frames whose events are written to the file so far."""
        return self._figure(Field.WRITTEN_FRAMES, "written_frames")

    @property
    def write_queue_size(self) -> int:
        """Chunks gathered and waiting to be written."""
        return 0 if self._ring is None else self._ring.get(Field.WRITE_QUEUE_SIZE)

    @property
    def missing_frames(self) -> FrameRanges:
        """Frames that never arrived, known once the run has ended (a sequence of ints).

        In an aborted run: the gaps below the newest frame received.
        """
        return self._result.missing_frames if self._result else FrameRanges()

    def statistics(self) -> RunStatistics:
        """A snapshot of the run's figures (ring occupancy, progress, backlog, peaks)."""
        self._check_open()
        assert self._ring is not None
        return read_statistics(self._ring)

    # -- internals -----------------------------------------------------------------------
    def _figure(self, field: Field, name: str) -> int:
        if self._result is not None:
            return int(getattr(self._result, name))
        return 0 if self._ring is None else self._ring.get(field)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this Writer was closed; start a new run with a new Writer")

    def _send(self, message: bytes) -> None:
        if self._control is None:
            return  # never started: nobody to tell
        try:
            self._control.send(message)
        except OSError:
            pass  # the writer is gone already; waiting for its result tells how

    def _close_producers(self) -> None:
        # our copies of the producers' pipe ends: once they are closed, the
        # writer sees end-of-file when the last worker holding one is gone
        for producer in self._producers:
            producer.close()

    def _receive(self, timeout_s: float | None) -> bytes:
        """Next message from the writer; b"" if it is gone; TimeoutError after timeout_s."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError(f"the writer sent nothing for {timeout_s} s")
            try:
                return self._messages.get(timeout=wait)
            except queue.Empty:
                if self._worker is not None and not self._worker.is_alive():
                    try:  # its last words, if the reader has not passed them on yet
                        return self._messages.get(timeout=1.0)
                    except queue.Empty:
                        return b""

    def _wait_for_result(self, timeout_s: float | None) -> RunResult:
        return self._parse_result(self._receive(timeout_s))

    def _parse_result(self, message: bytes) -> RunResult:
        if message.startswith(MSG_RESULT):
            result: RunResult = pickle.loads(zlib.decompress(message[1:]))
            return result
        error = "the writer died"
        if isinstance(self._worker, multiprocessing.process.BaseProcess):
            self._worker.join(5.0)
            error = f"the writer process died (exit code {self._worker.exitcode})"
            if not self._worker.is_alive():
                self._release_file()
        if self._ring is not None:
            self._ring.set_error_text(error)
            self._ring.set(Field.STATE, State.FAILED)
        return RunResult(state=State.FAILED, written_events=self.written_events,
                         written_frames=self.written_frames, missing_frames=FrameRanges(),
                         rejected_frames=0, error=error)

    def _release_file(self) -> None:
        """Let plain (non-SWMR) readers open the file the dead writer left behind.

        Only a file the writer made: one that died before creating it leaves
        the path alone, whatever is there (another run's file, maybe in use).
        Once the writer has started, the file is its own; before, only a file
        that changed since the Writer was made.
        """
        identity = _file_identity(self.path)
        if identity is None or (not self._writer_started and identity == self._path_before):
            return
        try:
            make_readable(self.path)
        except (OSError, ValueError) as exc:
            logger.warning("could not clear the write flags of %s: %s", self.path, exc)

    def _raise_for_result(self, result: RunResult) -> None:
        if result.state is State.FAILED:
            self._release_file()
            raise BrokenError(f"the run failed: {result.error}")
        if result.state is State.ABORTED:  # not by us (close() was waiting): SIGTERM, say
            raise BrokenError(f"the run was aborted ({result.error}) after "
                              f"{result.written_frames} frames; the file holds them")
        if result.missing_frames and not self.allow_gaps:
            raise MissingFramesError(result.missing_frames)

    def _clean_up(self) -> None:
        self._closed = True
        self._close_producers()
        if self._worker is not None and _started(self._worker):
            self._worker.join(_ABORT_TIMEOUT_S)
        if self._control is not None:
            try:
                self._control.shutdown(socket.SHUT_RDWR)  # wakes the control reader
            except OSError:
                pass
            self._control.close()
        if self._ring is not None:
            ring, self._ring = self._ring, None
            ring.close()
            ring.unlink()


#: Signals the writer process handles itself (see ``run_in_process``).
_OWNER_DECIDES = {signal.SIGINT, signal.SIGTERM}


def _abort_reason(exc_type: type[BaseException]) -> str:
    """The run log's reason for an abort caused by ``exc_type``."""
    if issubclass(exc_type, KeyboardInterrupt):
        return "interrupted: KeyboardInterrupt"
    return f"an exception in the with block: {exc_type.__name__}"


def _file_identity(path: str) -> tuple[int, int, int, int] | None:
    """Device, inode, status-change time and size of the file at ``path``; None if there is
    none or it cannot be read.

    Creating the file replaces it in place (the same inode) but changes its
    status-change time (in clock ticks of a few ms) and, all but always, its size.
    """
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_ctime_ns, stat.st_size


def _started(worker: threading.Thread | multiprocessing.process.BaseProcess) -> bool:
    if isinstance(worker, threading.Thread):
        return worker.ident is not None
    return worker.pid is not None


def _read_control(control: socket.socket, messages: queue.Queue[bytes]) -> None:
    """Control reader thread: pass log records to logging, queue everything else."""
    while True:
        try:
            message = control.recv(_CONTROL_BUFFER_NBYTES)
        except ConnectionResetError:
            continue  # reported once, before the messages still queued
        except OSError:
            message = b""
        if message.startswith(MSG_LOG):
            record = logging.makeLogRecord(pickle.loads(message[1:]))
            logging.getLogger(record.name).handle(record)
            continue
        messages.put(message)
        if not message or message.startswith(MSG_RESULT):
            return
