"""The writer's entry points: a writer process of its own, or a thread of the owner's.

:func:`serve` runs one :class:`~._loop.WriterLoop` and sends its result back
over the control socket. :func:`run_in_process` is the target of the writer
process: it sets up the signals and forwards log records to the Writer.
"""

from __future__ import annotations

import logging
import pickle
import signal
import socket
import zlib

from .._channel.control import MESSAGE_NBYTES, MSG_LOG, MSG_RESULT
from .loop import WriterLoop
from .run import RunConfig

__all__ = ["run_in_process", "serve"]

logger = logging.getLogger(__name__)


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
