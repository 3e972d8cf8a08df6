"""A producer's side of slot grants: the slots it holds unused, and those it asked for.

:class:`SlotGrants` asks the writer for slots (REQUEST, or REQUEST_RUN for
consecutive ones) and reads the grants from the producer's grant pipe. A
producer that has to wait gives back what it holds and asks for all it needs
at once, so a waiting producer holds no slot and producers cannot deadlock
each other.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..errors import BrokenError, RingFullError
from .records import GRANT_NONE, GRANT_REFUSED, MAX_SLOTS_PER_RECORD, Kind, encode_record

__all__ = ["SlotGrants"]

_now = time.monotonic


class SlotGrants:
    """The slots of one producer, between the writer's grants and its frames.

    Parameters
    ----------
    send
        Sends records to the writer (down the producer's descriptor pipe).
    read
        Waits at most the given seconds for grants: returns them, [] on
        timeout, None once the writer closed the grant pipe.
    writer_gone
        The error to raise when the writer closed the pipe or refused the producer.
    ring_full
        The message of the RingFullError for ``(frame, slots, timeout_s)``.
    """

    def __init__(self, send: Callable[[bytes], None],
                 read: Callable[[float], list[int] | None],
                 writer_gone: Callable[[], Exception],
                 ring_full: Callable[[int, int, float], str]) -> None:
        self._send, self._read = send, read
        self._writer_gone, self._ring_full = writer_gone, ring_full
        self._cache: list[int] = []  # granted slots not used yet
        self._owed = 0  # slots asked for and not granted yet

    @property
    def unused(self) -> list[int]:
        """Slots granted and not used (given back when the producer closes)."""
        return list(self._cache)

    def keep(self, slots: list[int]) -> None:
        """Slots taken but not sent after all: they serve the next frames."""
        self._cache.extend(slots)

    def take(self, frame_index: int, nslots: int, timeout_s: float) -> list[int]:
        """``nslots`` granted slots, asked for on behalf of ``frame_index``.

        Raises
        ------
        RingFullError
            If they were not granted within ``timeout_s``.
        """
        deadline = _now() + timeout_s
        if len(self._cache) + self._owed < nslots:
            if self._owed:
                # at most one request is out at a time: a grant then answers exactly it
                # (with spare slots, maybe), so what is owed is never miscounted
                self._wait(frame_index, len(self._cache) + self._owed, timeout_s)
            if len(self._cache) < nslots:
                self._ask(Kind.REQUEST, frame_index, nslots)
        self._wait(frame_index, nslots, max(0.0, deadline - _now()))
        slots, self._cache = self._cache[:nslots], self._cache[nslots:]
        return slots

    def take_run(self, frame_index: int, nslots: int, timeout_s: float) -> list[int]:
        """``nslots`` consecutive granted slots, asked for on behalf of ``frame_index``.

        Grants still owed are awaited first, so that the next grants are the
        run and nothing else.

        Raises
        ------
        RingFullError
            If the run was not granted within ``timeout_s``.
        BrokenError
            If the writer granted slots that are not consecutive.
        """
        deadline = _now() + timeout_s
        if self._owed:
            self._wait(frame_index, len(self._cache) + self._owed, timeout_s)
        self._ask(Kind.REQUEST_RUN, frame_index, nslots)
        self._wait(frame_index, nslots, max(0.0, deadline - _now()))
        return self._consecutive(frame_index, nslots)

    def _consecutive(self, frame_index: int, nslots: int) -> list[int]:
        """The first ``nslots`` held, which the writer granted as a run."""
        run, self._cache = self._cache[:nslots], self._cache[nslots:]
        if run != list(range(run[0], run[0] + nslots)):
            self._cache.extend(run)
            raise BrokenError(f"frame {frame_index}: the writer granted slots {run}, not "
                              f"{nslots} consecutive ones")
        return run

    def take_now(self, frame_index: int, nslots: int, answer_s: float) -> list[int]:
        """``nslots`` granted slots if the writer has them free right now.

        The writer answers at once (REQUEST_NOW); ``answer_s`` bounds the wait
        for its answer. Grants still owed are withdrawn first (:meth:`cancel`).

        Raises
        ------
        RingFullError
            If the slots are not free now.
        """
        if len(self._cache) < nslots:
            self.cancel(answer_s)
        if len(self._cache) < nslots:
            self._ask(Kind.REQUEST_NOW, frame_index, nslots)
            if not self._answered(nslots, answer_s):
                raise RingFullError(self._ring_full(frame_index, nslots, 0.0))
        slots, self._cache = self._cache[:nslots], self._cache[nslots:]
        return slots

    def take_run_now(self, frame_index: int, nslots: int, answer_s: float) -> list[int]:
        """:meth:`take_run` if the writer has such a run free right now (REQUEST_RUN_NOW).

        Raises
        ------
        RingFullError
            If no run of ``nslots`` free slots is there now.
        BrokenError
            If the writer granted slots that are not consecutive.
        """
        self.cancel(answer_s)
        self._ask(Kind.REQUEST_RUN_NOW, frame_index, nslots)
        if not self._answered(nslots, answer_s):
            raise RingFullError(self._ring_full(frame_index, nslots, 0.0))
        return self._consecutive(frame_index, nslots)

    def cancel(self, answer_s: float) -> None:
        """Withdraw the request still owed, if any; what was granted meanwhile is kept."""
        if self._owed:
            self._send(encode_record(Kind.CANCEL))
            self._answered(None, answer_s)

    def _answered(self, nslots: int | None, answer_s: float) -> bool:
        """Read until the writer's answer: True once ``nslots`` are held, False at NOTHING.

        With ``nslots`` None only NOTHING ends it (the answer to CANCEL).
        """
        deadline = _now() + answer_s
        while nslots is None or len(self._cache) < nslots:
            grants = self._read(deadline - _now())
            if grants is None or GRANT_REFUSED in grants:
                raise self._writer_gone()
            nothing = GRANT_NONE in grants
            self._cache.extend(slot for slot in grants if slot >= 0)
            if nothing:
                self._owed = 0
                return nslots is not None and len(self._cache) >= nslots
            if not grants and _now() >= deadline:
                raise BrokenError(f"the writer did not answer within {answer_s:.0f} s")
        self._owed = 0
        return True

    def _ask(self, kind: Kind, frame_index: int, nslots: int) -> None:
        """Give back what is held and ask for ``nslots`` at once."""
        # one record per write: a write of more than PIPE_BUF bytes may be cut short
        for at in range(0, len(self._cache), MAX_SLOTS_PER_RECORD):
            self._send(encode_record(Kind.RELEASE,
                                     slots=self._cache[at:at + MAX_SLOTS_PER_RECORD]))
        self._cache.clear()
        self._send(encode_record(kind, frame_index, nevents=nslots))
        self._owed = nslots

    def _wait(self, frame_index: int, nslots: int, timeout_s: float) -> None:
        deadline = _now() + timeout_s
        while len(self._cache) < nslots:
            grants = self._read(deadline - _now())
            if grants is None or GRANT_REFUSED in grants:
                raise self._writer_gone()
            self._cache.extend(grants)
            self._owed = max(0, self._owed - len(grants))
            if len(self._cache) < nslots and _now() >= deadline:
                raise RingFullError(self._ring_full(frame_index, nslots, timeout_s))
