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
from .records import GRANT_REFUSED, Kind, encode_record

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
        run, self._cache = self._cache[:nslots], self._cache[nslots:]
        if run != list(range(run[0], run[0] + nslots)):
            self._cache.extend(run)
            raise BrokenError(f"frame {frame_index}: the writer granted slots {run}, not "
                              f"{nslots} consecutive ones")
        return run

    def _ask(self, kind: Kind, frame_index: int, nslots: int) -> None:
        """Give back what is held and ask for ``nslots`` at once."""
        message = encode_record(kind, frame_index, nevents=nslots)
        if self._cache:
            message = encode_record(Kind.RELEASE, slots=self._cache) + message
            self._cache.clear()
        self._send(message)
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
