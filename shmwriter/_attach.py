"""Tickets: any process of this user on this host attaches a producer to a run.

A :class:`Ticket` is a small picklable value with no file descriptors in it:
the ring's spec, the address of the writer's attach socket and a secret. The
writer loop listens on that Unix socket (in Linux's abstract namespace: no
file to leak, it goes with the listening process). A process holding the
ticket connects and shows the secret; the writer checks it and the peer's
user id (which the kernel vouches for, SO_PEERCRED), makes the two pipes of a
new producer channel and passes the producer's ends over the socket
(SCM_RIGHTS). They then live only in that process, so its death, even before
its first put, is an end of file the writer sees at once.

:class:`AttachServer` is the writer's side (owned by the writer loop);
:func:`attach` the producer's.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import socket
import struct
from dataclasses import dataclass, field

import posix_ipc

from ._channel import open_pipe_pair
from ._ring import RingSpec, SlotRing, State
from .errors import AttachError, ClosedError
from .producer import Producer

__all__ = ["AttachServer", "Ticket", "attach", "attach_on_unpickle", "new_ticket",
           "open_channel"]

logger = logging.getLogger(__name__)

_MAGIC = b"shmw-attach-1"
_HELLO = struct.Struct(f"<{len(_MAGIC)}s32s")
_OK, _REFUSED, _CLOSED = b"K", b"R", b"C"
_REPLY_NBYTES = 1024
#: How long the writer waits for a connected peer's hello before it drops the peer.
_HELLO_TIMEOUT_S = 0.5
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True, slots=True, kw_only=True)
class Ticket:
    """What a process needs to attach a producer to a run; get it from ``Writer.ticket()``.

    It pickles as a few strings and ints (no file descriptors), so it can go
    anywhere: a command line, a file, a job scheduler, a Ray or Dask task.
    It is good on the host (and in the PID namespace) of the run only, and
    for the user that runs it. Keep it private: whoever holds it can put frames.
    """

    ring: RingSpec
    """The run's ring."""
    address: str
    """Name of the writer's attach socket in the abstract namespace."""
    secret: str = field(repr=False)
    """Proves the holder was given the ticket (hex)."""
    host: str
    """Boot id of the run's machine."""
    pid_namespace: str
    """PID namespace of the run's writer."""
    timeout_s: float
    """How long a producer waits for free slots (the Writer's ``timeout_s``)."""


def new_ticket(ring: RingSpec, timeout_s: float) -> Ticket:
    """A ticket with a fresh secret for ``ring``, valid on this host."""
    return Ticket(ring=ring, address=f"shmwriter/{ring.name}", secret=secrets.token_hex(32),
                  host=_boot_id(), pid_namespace=_pid_namespace(), timeout_s=timeout_s)


def attach(ticket: Ticket, *, timeout_s: float = 10.0) -> Producer:
    """Attach a new producer to the run of ``ticket``, from any process of its user and host.

    Parameters
    ----------
    ticket
        From :meth:`shmwriter.Writer.ticket`.
    timeout_s
        Longest wait for the writer's answer.

    Returns
    -------
    Producer
        A producer whose pipes live in this process only; close it when done.

    Raises
    ------
    AttachError
        If the ticket is for another host or PID namespace, or the writer refused it
        (a wrong secret, another user).
    ClosedError
        If the run has ended or no longer takes producers.
    TimeoutError
        If the writer did not answer within ``timeout_s``.
    """
    producer = open_channel(ticket, timeout_s)
    producer._say_hello()  # this process is the one that uses it: the writer learns its pid
    return producer


def open_channel(ticket: Ticket, timeout_s: float = 10.0) -> Producer:
    """A producer on a new channel, not yet tied to a process (see :func:`attach`).

    ``Writer.producer()`` uses this: the process that uses the producer (the
    owner, or a child it is passed to) introduces itself with its first record.
    """
    if not isinstance(ticket, Ticket):
        raise TypeError(f"ticket must be a shmwriter Ticket; got {type(ticket).__name__}")
    _check_same_host(ticket)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.settimeout(timeout_s)
        try:
            conn.connect("\0" + ticket.address)
        except (ConnectionRefusedError, FileNotFoundError):
            raise ClosedError(_ended_text(ticket)) from None
        conn.sendall(_HELLO.pack(_MAGIC, bytes.fromhex(ticket.secret)))
        try:
            reply, fds, _, _ = socket.recv_fds(conn, _REPLY_NBYTES, 2)
        except TimeoutError:
            raise TimeoutError(f"the writer did not answer within {timeout_s} s") from None
    if reply[:1] == _OK and len(fds) == 2:
        (producer_id,) = struct.unpack("<q", reply[1:9])
        return Producer(ticket.ring, producer_id, fds[0], fds[1], ticket.timeout_s, ticket)
    for fd in fds:
        os.close(fd)
    text = reply[1:].decode("utf-8", "replace")
    if reply[:1] == _CLOSED:
        raise ClosedError(text)
    raise AttachError(f"the writer refused the ticket: {text or 'no reason given'}")


def attach_on_unpickle(ticket: Ticket) -> Producer:
    """How a Producer pickled outside ``multiprocessing``'s process start comes back."""
    return attach(ticket)


class AttachServer:
    """The writer's attach socket: checks each peer and hands it a new channel.

    The writer loop owns it, polls :attr:`sock` for readability and calls
    :meth:`serve_one`; :meth:`close` (idempotent) stops listening.
    """

    _sock: socket.socket | None = None

    def __init__(self, ticket: Ticket) -> None:
        self._address, self._secret = ticket.address, bytes.fromhex(ticket.secret)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.bind("\0" + self._address)
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        #: Whether attaching is refused from now on (the run takes no new producers).
        self.closed_to_new = False

    @property
    def sock(self) -> socket.socket:
        """The listening socket, for the loop's selector."""
        assert self._sock is not None
        return self._sock

    def serve_one(self, producer_id: int) -> tuple[int, int, int] | None:
        """Answer one waiting peer; ``(desc_fd, grant_fd, peer pid)`` if it got a channel.

        ``producer_id`` is the id the new producer gets if it is accepted.
        """
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        with conn:
            conn.settimeout(_HELLO_TIMEOUT_S)
            pid, uid, _ = _CREDENTIALS.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size))
            problem = self._check(conn, uid)
            if problem is not None:
                kind, why = problem
                if kind == _REFUSED:
                    logger.error("refused to attach pid %d: %s", pid, why)
                _reply(conn, kind + why.encode("utf-8"))
                return None
            (desc_write, grant_read), (desc_read, grant_write) = open_pipe_pair()
            try:
                socket.send_fds(conn, [_OK + struct.pack("<q", producer_id)],
                                [desc_write, grant_read])
            except OSError as exc:  # the peer is gone already
                logger.warning("pid %d went away while attaching: %s", pid, exc)
                for fd in (desc_read, grant_write):
                    os.close(fd)
                return None
            finally:
                os.close(desc_write)
                os.close(grant_read)
        logger.debug("producer %d attached from pid %d", producer_id, pid)
        return desc_read, grant_write, pid

    def _check(self, conn: socket.socket, uid: int) -> tuple[bytes, str] | None:
        try:
            hello = conn.recv(_HELLO.size + 1)
        except (TimeoutError, OSError):
            return _REFUSED, "no hello within the time allowed"
        if uid != os.getuid():
            return _REFUSED, f"user {uid} is not the run's user"
        if len(hello) != _HELLO.size or not hello.startswith(_MAGIC):
            return _REFUSED, "not a shmwriter attach request"
        _, secret = _HELLO.unpack(hello)
        if not hmac.compare_digest(secret, self._secret):
            return _REFUSED, "wrong secret: this ticket is not this run's"
        if self.closed_to_new:
            return _CLOSED, "the run no longer takes producers: its Writer is closing it"
        return None

    def close(self) -> None:
        """Stop listening (idempotent)."""
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()


def _reply(conn: socket.socket, message: bytes) -> None:
    try:
        conn.send(message[:_REPLY_NBYTES])
    except OSError:
        pass  # the peer is gone; nothing to tell


def _check_same_host(ticket: Ticket) -> None:
    if ticket.host != _boot_id():
        raise AttachError(f"this ticket is for a run on another host (boot id {ticket.host}); "
                          f"a ticket only works on the machine of its run")
    if ticket.pid_namespace != _pid_namespace():
        raise AttachError(f"this ticket is for a run in another PID namespace "
                          f"({ticket.pid_namespace}, this process is in {_pid_namespace()}); "
                          f"attach from the run's container")


def _ended_text(ticket: Ticket) -> str:
    """Why nobody listens at the ticket's address: the run has ended (or never ran here)."""
    try:
        with SlotRing.attach(ticket.ring) as ring:
            state = ring.state
    except (OSError, ValueError, posix_ipc.ExistentialError):
        return f"the run of this ticket has ended (its ring {ticket.ring.name!r} is gone)"
    if state in (State.FAILED, State.ABORTED, State.ABORTING):
        return f"the run of this ticket has stopped ({state.name.lower()})"
    return "the run of this ticket has ended; its writer no longer takes producers"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            return file.read().strip()
    except OSError:  # not Linux: the host name will have to do
        return socket.gethostname()


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
