"""A producer's end of its channel: the two pipes, the hello, the grants, and why the writer left.

:class:`WriterLink` owns the producer's ends of the descriptor pipe and the
grant pipe (see :mod:`.records`) and the :class:`~.grants.SlotGrants` read
from them. The :class:`~shmwriter.Producer` decides what to send; the link
sends it, introduces the process with its first record, and turns a closed
channel into the error that says why (the ring's header tells it).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .._ring.ring import Field, RingSpec, SlotRing, State
from ..errors import BrokenError, ClosedError
from .grants import SlotGrants
from .records import Kind, encode_record, read_grants, write_record

__all__ = ["WriterLink"]


class WriterLink:
    """The producer's two pipe ends and what travels through them.

    Parameters
    ----------
    spec
        The run's ring.
    producer_id
        The producer's id in the run.
    desc_fd, grant_fd
        The producer's ends of its two pipes (owned from now on).
    timeout_s
        Longest wait for room in the descriptor pipe.
    ring
        Gives the ring mapped in this process (for the header's state and error text).
    """

    def __init__(self, spec: RingSpec, producer_id: int, desc_fd: int, grant_fd: int,
                 timeout_s: float, ring: Callable[[], SlotRing]) -> None:
        self._spec, self._id, self._timeout_s, self._ring = spec, producer_id, timeout_s, ring
        #: The producer's ends of the descriptor and grant pipes (-1 once closed).
        self.desc_fd, self.grant_fd = desc_fd, grant_fd
        #: The process that said HELLO (0 before).
        self.pid = 0
        #: The slots granted to this producer and those it asked for.
        self.grants = SlotGrants(self.send, self._read_grants, self.writer_gone_error,
                                 self._ring_full_message)

    def send(self, message: bytes) -> None:
        """Send records (at most PIPE_BUF bytes); the first from a process says HELLO first.

        Raises
        ------
        BrokenError, ClosedError
            If the writer closed the channel (see :meth:`writer_gone_error`).
        TimeoutError
            If the writer read nothing for ``timeout_s``.
        """
        if not self.pid:
            self.pid = os.getpid()
            message = encode_record(Kind.HELLO, self.pid) + message
        try:
            write_record(self.desc_fd, message, self._timeout_s)
        except BrokenError as exc:
            raise self.writer_gone_error() from exc

    def say_hello(self) -> None:
        """Tell the writer which process uses this producer (best effort; put() retries)."""
        try:
            self.send(b"")
        except (BrokenError, ClosedError, TimeoutError):
            self.pid = 0

    def ring_error(self) -> str:
        """The error text in the ring's header."""
        return self._ring().error_text or "no reason given"

    def writer_gone_error(self) -> Exception:
        """Why the writer closed this producer's channel, as the ring's header tells it.

        The writer puts the reason into the header before it closes any
        channel, so the header (not the pipe, which another process may have
        read) is what tells a refusal, the end of the run and a failure apart.
        """
        ring = self._ring()
        state = ring.state
        if state in (State.DONE, State.CLOSING):
            return ClosedError("the writer has finished the run; no more frames are taken")
        if state in (State.FAILED, State.ABORTING, State.ABORTED):
            return BrokenError(f"the writer stopped ({state.name.lower()}): {ring.error_text}")
        # a refusal names this producer in the header before the channel closes; any other
        # close while the run is on is the writer's death (its process may still be exiting)
        reason = ring.error_text
        if reason.startswith(f"producer {self._id} "):
            return BrokenError(f"the writer refused this producer: {reason}")
        return BrokenError(f"the writer died (pid {ring.get(Field.WRITER_PID)}): its end of "
                           f"the channel closed")

    def close(self) -> None:
        """Close both pipe ends (idempotent): the writer sees end of file."""
        for attr in ("desc_fd", "grant_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                os.close(fd)

    def _read_grants(self, timeout_s: float) -> list[int] | None:
        return read_grants(self.grant_fd, timeout_s)

    def _ring_full_message(self, frame_index: int, nslots: int, timeout_s: float) -> str:
        ring = self._ring()
        return (f"frame {frame_index}: waited {timeout_s:.1f} s for {nslots} free slot(s); "
                f"{ring.get(Field.SLOTS_IN_USE)} of {self._spec.slots} slots are in use and "
                f"the writer is at frame {ring.get(Field.FRAMES_DONE)} "
                f"(newest received {ring.get(Field.NEWEST_FRAME)})")
