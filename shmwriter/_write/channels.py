"""The server's side of the producers' channels: their pipes, what they sent, who is alive.

:class:`Channels` owns the server's ends of every channel's two pipes (see
:mod:`.._channel`) and their registration with the server's selector. Its
owner (the writer loop, or an EventQueue's hub) asks it for the records a
channel sent, sends through it, and retires channels through it; nothing else
closes a channel's descriptors. Both servers learn that a peer is gone the same
way: end of file on its pipe, or (checked now and then) its process is dead.
"""

from __future__ import annotations

import os
import selectors
from array import array
from collections.abc import Iterator

from .._channel.attach import Attached
from .._channel.records import Record, decode_records
from .._forks import close_in_forked_children
from .._liveness import is_alive

__all__ = ["Channels", "ProducerChannel"]

_READ_NBYTES = 65536


class ProducerChannel:
    """The writer's view of one producer."""

    __slots__ = ("buffer", "desc_fd", "done", "grant_fd", "id", "pid")

    def __init__(self, producer_id: int, desc_fd: int, grant_fd: int) -> None:
        #: The producer's id, unique in the run.
        self.id = producer_id
        self.desc_fd, self.grant_fd = desc_fd, grant_fd
        #: Pid of the process using it, once it said hello (0 before).
        self.pid = 0
        #: Bytes received that do not make a whole record yet.
        self.buffer = bytearray()
        #: Whether the channel is retired (its descriptors are closed).
        self.done = False


class Channels:
    """Every producer's channel of one run.

    Parameters
    ----------
    selector
        The loop's selector; each open channel's descriptor pipe is registered
        with the channel as its data.
    """

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self._selector = selector
        self._by_id: dict[int, ProducerChannel] = {}
        close_in_forked_children(self)

    def __getitem__(self, producer_id: int) -> ProducerChannel:
        return self._by_id[producer_id]

    def __iter__(self) -> Iterator[ProducerChannel]:
        return iter(list(self._by_id.values()))

    def add(self, attached: list[Attached], *, peer_is_user: bool = False) -> None:
        """Take the channels of newly attached producers.

        With ``peer_is_user`` the process that attached is the one that uses
        the channel (an EventQueue's); otherwise it says hello first (a
        Writer's producers are made by the owner and used by a child).
        """
        for new in attached:
            channel = ProducerChannel(new.producer_id, new.desc_fd, new.grant_fd)
            if peer_is_user:
                channel.pid = new.pid
            self._by_id[channel.id] = channel
            self._selector.register(channel.desc_fd, selectors.EVENT_READ, channel)

    def open_ids(self) -> set[int]:
        """Ids of the channels not retired."""
        return {c.id for c in self._by_id.values() if not c.done}

    def any_open(self) -> bool:
        """Whether some channel is not retired."""
        return any(not c.done for c in self._by_id.values())

    def read(self, channel: ProducerChannel) -> tuple[list[Record], int] | None:
        """The whole records waiting and the bytes read; None at end of file.

        End of file means every copy of the producer's pipe end is closed: it
        closed it or died.
        """
        try:
            raw = os.read(channel.desc_fd, _READ_NBYTES)
        except BlockingIOError:
            return [], 0
        if not raw:
            return None
        channel.buffer += raw
        return list(decode_records(channel.buffer)), len(raw)

    def dead(self) -> list[ProducerChannel]:
        """The open channels whose process is known and has died."""
        return [c for c in self._by_id.values() if not c.done and c.pid and not is_alive(c.pid)]

    def send(self, channel: ProducerChannel, slots: list[int]) -> None:
        """Send slot numbers (grants, or the refusal) down the grant pipe."""
        self.send_bytes(channel, array("i", slots).tobytes())

    def send_bytes(self, channel: ProducerChannel, message: bytes) -> bool:
        """Send ``message`` (at most PIPE_BUF bytes: written whole) down the grant pipe.

        Returns False if it could not be sent: the peer is gone (its slots come
        back when it is retired) or reads nothing while its pipe is full.
        """
        try:
            os.write(channel.grant_fd, message)
        except OSError:
            return False
        return True

    def _close_after_fork(self) -> None:
        """In a forked child: close the copies of every channel's descriptors."""
        for channel in self._by_id.values():
            if not channel.done:
                channel.done = True
                os.close(channel.desc_fd)
                os.close(channel.grant_fd)

    def retire(self, channel: ProducerChannel) -> bool:
        """Close the channel's descriptors; False if it was retired already."""
        if channel.done:
            return False
        channel.done = True
        self._selector.unregister(channel.desc_fd)
        os.close(channel.desc_fd)
        os.close(channel.grant_fd)
        return True
