"""The sink thread: writes chunks in order from a bounded queue, so gathering seldom waits.

The Writer's loop and the dcnum drop-in (:mod:`shmwriter.compat.dcnum`) both
hand their chunks to one :class:`SinkThread`. The queue holds few chunks, so
memory stays bounded: when the disk is behind, the gathering thread waits in
:meth:`SinkThread.put`. After a write fails the thread keeps taking chunks
(and drops them), so that nobody ever waits on a dead sink; the failure is
raised by the next :meth:`~SinkThread.put` and by
:meth:`~SinkThread.raise_if_failed`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["SinkThread"]

ChunkT = TypeVar("ChunkT")
_PUT_SLICE_S = 0.25  # between tries to queue a chunk, the thread's liveness is checked


class SinkThread(Generic[ChunkT]):
    """One thread writing chunks, in the order they are put, with ``write``.

    Parameters
    ----------
    write
        Writes one chunk (called in the sink thread).
    where
        What is written, for the error message ("writing {where} failed").
    queue_size
        Chunks that may wait while one is written.
    on_written
        Called in the sink thread after each chunk was written.
    on_queue_size
        Called with the number of chunks waiting whenever it changes.
    name
        The thread's name.
    """

    def __init__(self, write: Callable[[ChunkT], object], *, where: str, queue_size: int,
                 on_written: Callable[[ChunkT], object] | None = None,
                 on_queue_size: Callable[[int], object] | None = None,
                 name: str = "shmwriter-sink") -> None:
        self._write, self._where = write, where
        self._on_written, self._on_queue_size = on_written, on_queue_size
        self._chunks: queue.Queue[ChunkT | None] = queue.Queue(queue_size)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        #: What made a write fail, or None.
        self.error: BaseException | None = None

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def put(self, chunk: ChunkT) -> None:
        """Queue ``chunk``, waiting while the disk is behind.

        Raises
        ------
        OSError
            If an earlier write failed (the message names ``where``).
        """
        self._enqueue(chunk, raise_on_failure=True)

    def finish(self) -> None:
        """Write what is queued and end the thread (a failure stays in :attr:`error`)."""
        if not self._thread.is_alive():
            return
        self._enqueue(None, raise_on_failure=False)
        while self._thread.is_alive():
            self._thread.join(1.0)

    def raise_if_failed(self) -> None:
        """Raise OSError (its cause the failure) if a write failed."""
        if self.error is not None:
            raise OSError(f"writing {self._where} failed: {self.error}") from self.error

    def qsize(self) -> int:
        """Chunks waiting to be written."""
        return self._chunks.qsize()

    def _enqueue(self, chunk: ChunkT | None, *, raise_on_failure: bool) -> None:
        while True:
            if raise_on_failure:
                self.raise_if_failed()
            try:
                self._chunks.put(chunk, timeout=_PUT_SLICE_S)
                break
            except queue.Full:
                if not self._thread.is_alive():
                    if chunk is None:
                        return  # ended already: nothing more to say
                    self.raise_if_failed()
                    raise OSError(f"writing {self._where} failed: its sink thread is gone"
                                  ) from None
        self._publish()

    def _run(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            if self.error is None:
                self._handle(chunk)
            # no reference kept while waiting for the next: memory the chunk's owner
            # frees once it is written goes at once
            del chunk
        if self.error is None:
            try:
                self._publish()
            except BaseException as exc:
                self.error = exc

    def _handle(self, chunk: ChunkT) -> None:
        """Write ``chunk`` and say so; a failure stays in :attr:`error`."""
        try:
            self._write(chunk)
            if self._on_written is not None:
                self._on_written(chunk)
            self._publish()
        except BaseException as exc:  # raised by put(); the caller logs it
            self.error = exc

    def _publish(self) -> None:
        if self._on_queue_size is not None:
            self._on_queue_size(self._chunks.qsize())

    def __repr__(self) -> str:
        state = "failed" if self.error else "running" if self._thread.is_alive() else "idle"
        return f"<SinkThread {self._where!r} ({state}, {self.qsize()} chunk(s) queued)>"
