"""Drop-ins for dcnum's queue writers: ``QueueWriterThread`` and ``QueueWriterProcess``.

Pipelines built on ``dcnum.write.QueueWriterThread`` / ``QueueWriterProcess``
switch by changing the import. The constructor, the attributes and the file
written are dcnum's (see :mod:`shmwriter.compat._stash` for the file). Pass a
:class:`shmwriter.EventQueue` instead of the ``multiprocessing.Queue`` and the
events travel through shared memory: the writer copies them straight from the
queue's slots into the chunk it writes.

How a run goes, as in dcnum: the writer takes the frames ``write_threshold``
at a time. Once ``feat_nevents`` has no -1 left for the next window, it
collects that window's frames from the queue (frames of later windows wait
in memory), writes them in frame order with ``index_unmapped`` and ``nevents``
and counts ``written_events`` / ``written_frames``. It stops after the last
frame of ``feat_nevents``. Unlike dcnum it keeps taking frames from the queue
while it waits for ``feat_nevents``, so an EventQueue's slots keep moving;
frames it holds beyond half of the queue's slots are copied out of them.

What it shares with the Writer, and what is its own: the queue (an EventQueue
serves slots with the Writer's protocol and allocator), the bounded sink
thread (:class:`~shmwriter._write.sink_thread.SinkThread`) and the creation of
the datasets (:func:`~shmwriter._write.h5sink.create_event_dataset`) are the
Writer's. Its own is what dcnum's file needs and the Writer's must not do:
windows cut by ``feat_nevents`` (not by frames received), a frame that comes
twice replacing the first, features that a frame may lack (zero there), the
dtype of ``nevents`` taken from ``feat_nevents``. These live in
:mod:`shmwriter.compat._stash`, with the tests that compare the file, dataset
by dataset, with dcnum's own.

Logging, as in dcnum: the records come from the logger
``dcnum.write.<class name>`` at the level of the ``dcnum`` logger, so they
reach the handlers dcnum's pipeline puts on ``dcnum`` (a thread writer) or
its ``log_queue`` (a process writer). A failure is logged as a traceback.
Every record is cut into lines that fit dclab's limit for log lines
(:data:`LOG_LINE_MAX`) once dcnum's format (:data:`DCNUM_LOG_FORMAT`) has put
time, level and logger name in front, so the pipeline's log, which dcnum
stores in the output file, passes ``dclab``'s ``check_dataset``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
import traceback
from collections.abc import Iterable, MutableMapping
from logging.handlers import QueueHandler
from multiprocessing.context import SpawnProcess
from typing import Any

import numpy as np

from .._rtdc import LOG_LINE_LIMIT
from .._validate import check_positive_int
from .._write.sink_thread import SinkThread
from ..eventqueue import EventQueue
from ._stash import Arrived, ChunkBuilder, DcnumFile, arrived_from_events, arrived_from_lease

__all__ = ["QueueWriterBase", "QueueWriterProcess", "QueueWriterThread"]

_MP_SPAWN = multiprocessing.get_context("spawn")
_CHUNK_QUEUE_SIZE = 4       # chunks waiting for the disk before collecting waits too
_WAIT_NEVENTS_S = 0.03      # dcnum's pause while feat_nevents has -1 in the window
_WAIT_FRAMES_S = 0.3        # dcnum's event_queue.get timeout
_READ_AHEAD = 8             # frames of an EventQueue on their way to the writer

#: The format of dcnum's pipeline log (``dcnum.logic.ctrl.DCNumJobRunner`` writes its log
#: file with it and stores the file's lines in the output file's /logs).
DCNUM_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: The time format of dcnum's pipeline log: always 8 characters.
DCNUM_LOG_DATEFMT = "%H:%M:%S"
#: The longest log line ``dclab.rtdc_dataset.check_dataset`` accepts without an alert.
LOG_LINE_MAX = LOG_LINE_LIMIT
_MIN_FIRST_LINE = 20        # less room than this after the prefix: start on the next line


def fit_log_text(logger_name: str, level: int, text: str) -> str:
    """``text`` cut into lines that fit :data:`LOG_LINE_MAX` in dcnum's pipeline log.

    dcnum's format puts ``"HH:MM:SS LEVEL logger.name: "`` before the first
    line of a record; the other lines of a record stand alone. Lines too long
    are broken at a space where there is one (else anywhere) and continue,
    indented by two spaces, on the next line. When the prefix leaves less than
    20 characters, the text starts on the line after it. Every line then fits
    for logger names of up to ``LOG_LINE_MAX - 20`` (80) characters.

    Parameters
    ----------
    logger_name
        The name of the logger the record goes through.
    level
        Its level (``logging.INFO`` ...).
    text
        The message; may have several lines (a traceback); a final newline is dropped.

    Returns
    -------
    str
        The message to log.
    """
    prefix = len(time.strftime(DCNUM_LOG_DATEFMT, time.gmtime(0)))  # "HH:MM:SS"
    prefix += 1 + len(logging.getLevelName(level)) + 1 + len(logger_name) + 2
    first = LOG_LINE_MAX - prefix
    lines: list[str] = [] if first >= _MIN_FIRST_LINE else [""]
    for line in text.rstrip("\n").split("\n"):
        lines.extend(_wrap_line(line, first if not lines else LOG_LINE_MAX))
    return "\n".join(lines)


def _wrap_line(line: str, width: int) -> list[str]:
    """``line`` as pieces of at most ``width`` (then LOG_LINE_MAX) characters."""
    pieces = []
    while len(line) > width:
        cut = line.rfind(" ", 1, width + 1)
        if cut <= 0 or not line[:cut].strip():
            cut = width  # no space to break at (a long path): break anywhere
        pieces.append(line[:cut].rstrip())
        line = "  " + line[cut:].lstrip()
        width = LOG_LINE_MAX
    pieces.append(line)
    return pieces


def end_of_data_message(last: int, total: int) -> str:
    """What the writer logs when it reached the end of ``feat_nevents`` (dcnum's words)."""
    return f"Reached dataset end (frame {last} of {total})"


def _log(logger: logging.Logger, level: int, text: str) -> None:
    """Log ``text`` through ``logger``, cut to fit dcnum's pipeline log (:func:`fit_log_text`)."""
    if logger.isEnabledFor(level):
        logger.log(level, fit_log_text(logger.name, level, text))


class QueueWriterBase:
    """Write events from a queue of ``(frame_index, events)`` tuples to an .rtdc file.

    Parameters
    ----------
    event_queue
        A ``multiprocessing.Queue`` (or :class:`shmwriter.EventQueue`, the
        zero-copy path) to which workers put ``(frame_index, events_dict)``.
    write_queue_size
        An ``mp.Value`` set to the number of chunks waiting to be written.
    feat_nevents
        1-D ``mp.Array`` (or array) of the events of each frame; -1 for a frame
        not processed yet. Its length is the number of frames of the run.
    path_out
        The .rtdc file to write (replaced if it exists).
    hdf5_dataset_kwargs
        Dataset creation keywords (default Zstd level 5 and fletcher32).
    write_threshold
        Frames collected and written at a time.
    *args, **kwargs
        Passed on to ``threading.Thread`` or ``Process``.

    Raises
    ------
    ValueError
        If ``write_threshold`` is not a positive integer.
    """

    def __init__(self, event_queue: Any, write_queue_size: Any, feat_nevents: Any,
                 path_out: str | os.PathLike[str],
                 hdf5_dataset_kwargs: dict[str, Any] | None = None, write_threshold: int = 500,
                 *args: Any, **kwargs: Any) -> None:
        # dcnum accepts any value and then writes an empty file; say so at once instead
        check_positive_int("write_threshold", write_threshold)
        #: Logging level, taken from the 'dcnum' logger (as dcnum does).
        self.log_level = logging.getLogger("dcnum").level
        super().__init__(*args, **kwargs)
        #: Queue from which the events are collected.
        self.event_queue = event_queue
        #: Number of chunks waiting to be written to the output file.
        self.write_queue_size = write_queue_size
        #: Shared array of the number of events of each frame (-1: not processed yet).
        self.feat_nevents = feat_nevents
        #: HDF5 output path.
        self.path_out = path_out
        #: HDF5 dataset creation keyword arguments.
        self.hdf5_dataset_kwargs = hdf5_dataset_kwargs
        #: Frames collected and written at a time.
        self.write_threshold = write_threshold
        #: Events handed to the file writer so far (``mp.Value("Q")``).
        self.written_events = _MP_SPAWN.Value("Q", 0)
        #: Frames handed to the file writer so far (``mp.Value("Q")``).
        self.written_frames = _MP_SPAWN.Value("Q", 0)

    def get_logger(self) -> logging.Logger:
        """This writer's logger, ``dcnum.write.<class name>`` at :attr:`log_level`, as dcnum's.

        Being under ``dcnum``, its records reach the handlers dcnum's pipeline
        puts there. Made in ``run``: a logger must not be pickled.
        """
        logger = logging.getLogger(f"dcnum.write.{type(self).__name__}")
        logger.setLevel(self.log_level)
        return logger

    def run(self, buffer_dq: Any = None, writer_dq: Any = None,
            logger: logging.Logger | None = None) -> None:
        """Collect and write every frame of ``feat_nevents``; works in any thread or process.

        Parameters
        ----------
        buffer_dq
            Optional deque of ``(frame_index, events)`` already taken from the
            queue; they are used first (dcnum's testing hook).
        writer_dq
            Accepted for dcnum's signature; shmwriter writes chunks directly.
        logger
            Logger to use instead of :meth:`get_logger`.

        Raises
        ------
        ValueError
            If a frame does not fit what was written before (the message names
            the frame); what was collected before is in the file.
        OSError
            If writing the file failed.

        Notes
        -----
        A failure (anything but ``KeyboardInterrupt``) is logged as a
        traceback at ERROR before it is raised.
        """
        logger = logger or self.get_logger()
        try:
            self._run(buffer_dq, writer_dq, logger)
        except KeyboardInterrupt:
            raise
        except BaseException:
            _log(logger, logging.ERROR, traceback.format_exc())
            raise

    def _run(self, buffer_dq: Any, writer_dq: Any, logger: logging.Logger) -> None:
        if writer_dq is not None:
            _log(logger, logging.WARNING, "Specifying `writer_dq` has no effect")
        cancel = getattr(self.event_queue, "cancel_join_thread", None)
        if cancel is not None:
            cancel()  # we never put into the queue: do not wait for its feeder at exit
        source = _source_for(self.event_queue)
        pending: dict[int, Arrived] = {}
        for index, events in _drain(buffer_dq):
            _keep(pending, int(index), arrived_from_events(int(index), events), logger)
        file = DcnumFile(self.path_out, self.hdf5_dataset_kwargs)
        sink = SinkThread[dict[str, np.ndarray[Any, Any]]](
            file.append, where=str(file.path), queue_size=_CHUNK_QUEUE_SIZE,
            on_queue_size=self._publish_queue_size, name="shmwriter-dcnum-sink")
        sink.start()
        try:
            self._collect(source, pending, sink, logger)
        finally:
            source.close()
            for arrived in pending.values():
                arrived.release()
            sink.finish()
            close_error = _close_file(file, logger)
        sink.raise_if_failed()
        if close_error is not None:
            raise close_error
        _log(logger, logging.INFO, f"Counted {self.written_events.value} events")
        _log(logger, logging.DEBUG, f"Counted {self.written_frames.value} frames")

    def _publish_queue_size(self, size: int) -> None:
        self.write_queue_size.value = size

    def _collect(self, source: _Source, pending: dict[int, Arrived],
                 sink: SinkThread[dict[str, np.ndarray[Any, Any]]],
                 logger: logging.Logger) -> None:
        builder = ChunkBuilder()
        last = 0
        while True:
            window = self.feat_nevents[last:last + self.write_threshold]
            if np.any(np.array(window) < 0):  # frames not processed yet
                source.receive(pending, _WAIT_NEVENTS_S, logger)
                sink.raise_if_failed()
                continue
            if len(window) == 0:
                _log(logger, logging.INFO, end_of_data_message(last, len(self.feat_nevents)))
                return
            wanted = set(range(last, last + len(window))) - pending.keys()
            while wanted:
                wanted -= source.receive(pending, _WAIT_FRAMES_S, logger)
                sink.raise_if_failed()
            frames = {index: pending.pop(index) for index in range(last, last + len(window))}
            try:
                chunk = builder.build(last, window, frames)
            finally:
                for arrived in frames.values():
                    arrived.release()
            sink.put(chunk)
            self.written_events.value += len(chunk["index_unmapped"])
            self.written_frames.value += len(window)
            last += len(window)


class QueueWriterThread(QueueWriterBase, threading.Thread):
    """:class:`QueueWriterBase` in a thread (``start()``/``join()``), like dcnum's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, name="QueueWriterThread", **kwargs)


class QueueWriterProcess(QueueWriterBase, SpawnProcess):
    """:class:`QueueWriterBase` in a spawned process; its log records go to ``log_queue``.

    Parameters
    ----------
    log_queue
        A ``multiprocessing.Queue`` that receives this writer's log records
        (through a ``QueueHandler``), like dcnum's.
    *args, **kwargs
        As for :class:`QueueWriterBase`.

    Notes
    -----
    A writer that fails logs the traceback to ``log_queue`` (as dcnum's does)
    and its process exits with code 1 (dcnum's exits with 0), so that
    ``exitcode`` tells a failed writer from a finished one; so does one
    stopped by ``KeyboardInterrupt``.
    """

    def __init__(self, log_queue: Any, *args: Any, **kwargs: Any) -> None:
        #: Queue for the log records.
        self.log_queue = log_queue
        super().__init__(*args, name="QueueWriterProcess", **kwargs)

    def run(self, **kwargs: Any) -> None:  # type: ignore[override]
        """Run the writer with its log records going to ``log_queue``.

        Raises
        ------
        SystemExit
            With code 1 after a failure, in the writer's own process (after
            the traceback went to ``log_queue``). Called directly in another
            process, the failure itself is raised instead.
        """
        logger = self.get_logger()
        logger.handlers.clear()
        handler = QueueHandler(self.log_queue)
        handler.setLevel(self.log_level)
        logger.addHandler(handler)
        _log(logger, logging.INFO, "Ready")
        for key, value in kwargs.items():
            if value is not None:
                _log(logger, logging.WARNING,
                     f"Specifying `{key}` in `QueueWriterProcess.run` has no effect")
        failure: BaseException | None = None
        try:
            super().run(logger=logger)  # logs a failure's traceback itself
        except KeyboardInterrupt as exc:
            self.log_queue.cancel_join_thread()
            self.event_queue.cancel_join_thread()
            failure = exc
        except BaseException as exc:
            failure = exc
        handler.flush()
        handler.close()
        logger.removeHandler(handler)
        self.log_queue.close()
        self.log_queue.join_thread()
        if failure is not None:
            if multiprocessing.current_process() is self:
                raise SystemExit(1) from failure  # exit code 1, no second traceback on stderr
            raise failure


# -- sources: where frames come from -----------------------------------------------------------
class _Source:
    """Frames from a queue of (frame_index, events) tuples (mp.Queue or alike)."""

    def __init__(self, event_queue: Any) -> None:
        self.queue = event_queue

    def close(self) -> None:
        """Stop taking frames (those on their way go back to the queue)."""

    def receive(self, pending: MutableMapping[int, Arrived], timeout_s: float,
                logger: logging.Logger) -> set[int]:
        """Wait up to ``timeout_s`` for one frame; add it to ``pending``; return its index."""
        try:
            index, events = self.queue.get(timeout=timeout_s)
        except queue.Empty:
            return set()
        index = int(index)
        return _keep(pending, index, arrived_from_events(index, events), logger)


class _LeaseSource(_Source):
    """Frames from an EventQueue: left in its slots while fewer than half of them are held.

    They come through a reader, which keeps a few frames on their way: no round
    trip to the queue's hub per frame.
    """

    def __init__(self, event_queue: EventQueue) -> None:
        super().__init__(event_queue)
        self.held = 0
        self.reader = event_queue.reader(ahead=_READ_AHEAD)

    def close(self) -> None:
        self.reader.close()

    def receive(self, pending: MutableMapping[int, Arrived], timeout_s: float,
                logger: logging.Logger) -> set[int]:
        try:
            lease = self.reader.lease(timeout=timeout_s)
        except queue.Empty:
            return set()
        arrived = arrived_from_lease(lease, self._released)
        self.held += arrived.nslots
        if self.held > (self.queue.slots or 0) // 2:
            arrived.detach()  # producers need slots more than we need the copy saved
        return _keep(pending, lease.frame_index, arrived, logger)

    def _released(self, nslots: int) -> None:
        self.held -= nslots


def _source_for(event_queue: Any) -> _Source:
    if isinstance(event_queue, EventQueue):
        return _LeaseSource(event_queue)
    return _Source(event_queue)


def _keep(pending: MutableMapping[int, Arrived], index: int, arrived: Arrived,
          logger: logging.Logger) -> set[int]:
    old = pending.get(index)
    if old is not None:
        _log(logger, logging.WARNING, f"frame {index} arrived twice; the later one is kept")
        old.release()
    pending[index] = arrived
    return {index}


def _drain(buffer_dq: Any) -> Iterable[tuple[Any, Any]]:
    while buffer_dq:
        yield buffer_dq.popleft()


def _close_file(file: DcnumFile, logger: logging.Logger) -> OSError | None:
    """Close the file once the sink thread is done; return (and log) what went wrong."""
    try:
        file.close()
    except Exception as exc:
        # logged here: an error that came first is the one raised
        _log(logger, logging.ERROR, f"closing {file.path} failed: {exc}")
        error = OSError(f"closing {file.path} failed: {exc}")
        error.__cause__ = exc
        return error
    return None
