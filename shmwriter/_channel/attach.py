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
import queue
import secrets
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import posix_ipc

from .._forks import close_in_forked_children
from .._ring.ring import RingSpec, SlotRing, State
from ..errors import AttachError, ClosedError
from ..producer import Producer
from .records import open_pipe_pair

__all__ = ["AttachServer", "Attached", "Ticket", "attach", "attach_on_unpickle", "boot_id",
           "check_same_host", "new_ticket", "open_channel", "pid_namespace", "request_channel"]

logger = logging.getLogger(__name__)

_MAGIC = b"shmw-attach-1"
_HELLO = struct.Struct(f"<{len(_MAGIC)}s32s")
_OK, _REFUSED, _CLOSED = b"K", b"R", b"C"
_REPLY_NBYTES = 1024
#: How long the writer waits for a connected peer's hello before it drops the peer. Generous:
#: a peer among hundreds of threads may wait long for its GIL between connect and hello, and
#: a silent peer delays nobody meanwhile (each has its own deadline).
_HELLO_TIMEOUT_S = 5.0
_BACKLOG = 1024
_STOP_TIMEOUT_S = 5.0
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
                  host=boot_id(), pid_namespace=pid_namespace(), timeout_s=timeout_s)


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
    check_same_host(ticket.host, ticket.pid_namespace)
    try:
        producer_id, fds = request_channel(ticket.address, ticket.secret, timeout_s, nfds=2)
    except ClosedError as exc:
        raise ClosedError(str(exc) or _ended_text(ticket)) from None
    return Producer(ticket.ring, producer_id, fds[0], fds[1], ticket.timeout_s, ticket)


def request_channel(address: str, secret: str, timeout_s: float, *,
                    nfds: int) -> tuple[int, list[int]]:
    """Connect to the attach socket at ``address``, show ``secret``; return the channel.

    Returns
    -------
    tuple
        The channel's id and the ``nfds`` descriptors the server passed (the
        caller owns them): the two pipe ends, then what the server adds.

    Raises
    ------
    AttachError
        If the server refused (a wrong secret, another user).
    ClosedError
        If nobody listens (any more), or the server takes no new channels; its
        text is the server's reason, or empty.
    TimeoutError
        If the server did not answer within ``timeout_s``.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        reply, fds = _ask(conn, address, secret, timeout_s, nfds)
    if reply[:1] == _OK and len(fds) == nfds:
        (channel_id,) = struct.unpack("<q", reply[1:9])
        return channel_id, fds
    for fd in fds:
        os.close(fd)
    text = reply[1:].decode("utf-8", "replace")
    if reply[:1] == _CLOSED or not reply:
        raise ClosedError(text)
    raise AttachError(f"the ticket was refused: {text or 'no reason given'}")


def _ask(conn: socket.socket, address: str, secret: str, timeout_s: float,
         nfds: int) -> tuple[bytes, list[int]]:
    """Connect, show the secret, return the server's reply and the descriptors it passed."""
    # a blocking connect waits for room in a full backlog, for at most SO_SNDTIMEO
    seconds = max(timeout_s, 0.001)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                    struct.pack("ll", int(seconds), int(seconds % 1 * 1e6)))
    try:
        conn.connect("\0" + address)
        conn.settimeout(timeout_s)
        conn.sendall(_HELLO.pack(_MAGIC, bytes.fromhex(secret)))
        reply, fds, _, _ = socket.recv_fds(conn, _REPLY_NBYTES, nfds)
    except (ConnectionRefusedError, FileNotFoundError, ConnectionResetError,
            BrokenPipeError):  # nobody listens (any more): the run has ended
        raise ClosedError("") from None
    except (BlockingIOError, TimeoutError):
        raise TimeoutError(f"the writer did not answer within {timeout_s} s") from None
    return reply, fds


def attach_on_unpickle(ticket: Ticket) -> Producer:
    """How a Producer pickled outside ``multiprocessing``'s process start comes back."""
    return attach(ticket)


@dataclass(frozen=True, slots=True)
class Attached:
    """A channel the attach thread made: the writer's pipe ends and the producer's pid."""

    producer_id: int
    """The new producer's id."""
    desc_fd: int
    """The writer's (read) end of the descriptor pipe."""
    grant_fd: int
    """The writer's (write) end of the grant pipe."""
    pid: int
    """The peer's pid, as the kernel gave it."""


class AttachServer:
    """The writer's attach socket, served by a thread of its own.

    The thread accepts peers and checks each: its user id at once (the kernel
    says it), then its hello, with a deadline per peer, so that a silent, slow
    or hostile peer delays neither the writer loop nor other peers. For a good
    peer it makes the pipes of a new channel, queues the server's ends for its
    owner and passes the peer's ends to the peer. The owner (the writer loop,
    or an EventQueue's hub) watches :attr:`wakeup_fd`, collects new channels
    with :meth:`take`, calls :meth:`close_to_new` when it takes no more and
    :meth:`close` (idempotent) at the end.

    Parameters
    ----------
    address
        Name of the socket in the abstract namespace.
    secret
        What a peer must show (hex).
    pass_fds
        Descriptors passed to every peer after its two pipe ends (an
        EventQueue passes its segment); the caller keeps them open.
    closing_text
        What a peer is told once :meth:`close_to_new` was called.
    """

    _sock: socket.socket | None = None

    def __init__(self, address: str, secret: str, pass_fds: tuple[int, ...] = (),
                 closing_text: str = "the run no longer takes producers: its Writer is "
                                     "closing it") -> None:
        self._address, self._secret = address, bytes.fromhex(secret)
        self._pass_fds, self._closing_text = pass_fds, closing_text.encode("utf-8")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.bind("\0" + self._address)
            sock.listen(_BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._lock = threading.Lock()  # between the thread's queueing and close_to_new
        self._closed_to_new = False
        self._attached: queue.SimpleQueue[Attached] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._refusals = _RefusalLog()
        self._next_id = 0
        self._thread = threading.Thread(target=self._serve, name="shmwriter-attach",
                                        daemon=True)
        self._thread.start()
        close_in_forked_children(self)

    @property
    def wakeup_fd(self) -> int:
        """Readable when new channels wait to be taken."""
        return self._wake_r

    def take(self) -> list[Attached]:
        """The channels attached since the last call."""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        taken = []
        while True:
            try:
                taken.append(self._attached.get_nowait())
            except queue.Empty:
                return taken

    def close_to_new(self) -> list[Attached]:
        """Refuse attaching from now on; return the channels attached until now."""
        with self._lock:
            self._closed_to_new = True
        return self.take()

    def close(self) -> None:
        """Stop the thread and the socket; close the channels no one took (idempotent)."""
        if self._sock is None:
            return
        os.write(self._stop_w, b"x")
        self._thread.join(_STOP_TIMEOUT_S)
        sock, self._sock = self._sock, None
        sock.close()
        for attached in self.take():
            os.close(attached.desc_fd)
            os.close(attached.grant_fd)
        for fd in (self._wake_r, self._wake_w, self._stop_r, self._stop_w):
            os.close(fd)

    def _close_after_fork(self) -> None:
        """In a forked child: close the copies of the socket and of the pipes."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
            for fd in (self._wake_r, self._wake_w, self._stop_r, self._stop_w):
                os.close(fd)

    # -- the thread ---------------------------------------------------------------------
    def _serve(self) -> None:
        assert self._sock is not None
        peers: dict[socket.socket, float] = {}  # connected, hello not read yet: deadline
        with selectors.DefaultSelector() as selector:
            selector.register(self._sock, selectors.EVENT_READ, None)
            selector.register(self._stop_r, selectors.EVENT_READ, "stop")
            while True:
                wait = max(0.0, min(peers.values()) - time.monotonic()) if peers else None
                for key, _ in selector.select(wait):
                    if key.data == "stop":
                        for peer in peers:
                            peer.close()
                        return
                    if key.data is None:
                        self._accept_all(selector, peers)
                    else:
                        selector.unregister(key.data)
                        del peers[key.data]
                        with key.data:
                            self._answer(key.data)
                now = time.monotonic()
                for peer in [p for p, deadline in peers.items() if deadline <= now]:
                    selector.unregister(peer)
                    del peers[peer]
                    with peer:
                        self._refuse(peer, _peer_pid(peer), "no hello within the time allowed")

    def _accept_all(self, selector: selectors.BaseSelector,
                    peers: dict[socket.socket, float]) -> None:
        assert self._sock is not None
        while True:
            try:
                peer, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: try again at the next event
                logger.warning("could not accept a peer on the attach socket: %s", exc)
                return
            pid, uid = _peer_pid(peer), _peer_uid(peer)
            if uid != os.getuid():  # refused before anything is read from it
                with peer:
                    self._refuse(peer, pid, f"user {uid} is not the run's user")
                continue
            peer.setblocking(False)
            selector.register(peer, selectors.EVENT_READ, peer)
            peers[peer] = time.monotonic() + _HELLO_TIMEOUT_S

    def _answer(self, peer: socket.socket) -> None:
        pid = _peer_pid(peer)
        try:
            hello = peer.recv(_HELLO.size + 1)
        except OSError:
            return  # gone already
        if len(hello) != _HELLO.size or not hello.startswith(_MAGIC):
            self._refuse(peer, pid, "not a shmwriter attach request")
            return
        if not hmac.compare_digest(_HELLO.unpack(hello)[1], self._secret):
            self._refuse(peer, pid, "wrong secret: this ticket is not this run's")
            return
        (desc_write, grant_read), (desc_read, grant_write) = open_pipe_pair()
        with self._lock:
            admitted = not self._closed_to_new
            producer_id = self._next_id
            if admitted:
                self._next_id += 1
                # queued before the peer hears of it: the loop cannot end the run meanwhile
                self._attached.put(Attached(producer_id, desc_read, grant_write, pid))
        try:
            if not admitted:
                os.close(desc_read)
                os.close(grant_write)
                _reply(peer, _CLOSED + self._closing_text)
                return
            _wake(self._wake_w)
            socket.send_fds(peer, [_OK + struct.pack("<q", producer_id)],
                            [desc_write, grant_read, *self._pass_fds])
            logger.debug("producer %d attached from pid %d", producer_id, pid)
        except OSError as exc:  # the peer went away: its channel ends at once (EOF)
            logger.debug("pid %d went away while attaching: %s", pid, exc)
        finally:
            os.close(desc_write)
            os.close(grant_read)

    def _refuse(self, peer: socket.socket, pid: int, why: str) -> None:
        self._refusals.note(pid, why)
        _reply(peer, _REFUSED + why.encode("utf-8"))


class _RefusalLog:
    """Logs refused attaches, one line a second at most: a flood must not flood the log."""

    def __init__(self) -> None:
        self._last = -1.0
        self._unlogged = 0

    def note(self, pid: int, why: str) -> None:
        now = time.monotonic()
        if self._last >= 0 and now - self._last < 1.0:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more refused since the last report)" if self._unlogged else ""
        logger.error("refused to attach pid %d: %s%s", pid, why, more)
        self._last, self._unlogged = now, 0


def _reply(conn: socket.socket, message: bytes) -> None:
    try:
        conn.send(message[:_REPLY_NBYTES])
    except OSError:
        pass  # the peer is gone; nothing to tell


def _wake(fd: int) -> None:
    try:
        os.write(fd, b"x")
    except BlockingIOError:
        pass  # the pipe is full of wake-ups already


def _peer_credentials(peer: socket.socket) -> tuple[int, int]:
    pid, uid, _ = _CREDENTIALS.unpack(
        peer.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size))
    return pid, uid


def _peer_pid(peer: socket.socket) -> int:
    try:
        return _peer_credentials(peer)[0]
    except OSError:
        return 0


def _peer_uid(peer: socket.socket) -> int:
    try:
        return _peer_credentials(peer)[1]
    except OSError:
        return -1


def check_same_host(host: str, namespace: str) -> None:
    """Raise AttachError unless this process runs on ``host`` (a boot id), in ``namespace``."""
    if host != boot_id():
        raise AttachError(f"this ticket is for a run on another host (boot id {host}); "
                          f"a ticket only works on the machine of its run")
    if namespace != pid_namespace():
        raise AttachError(f"this ticket is for a run in another PID namespace "
                          f"({namespace}, this process is in {pid_namespace()}); "
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


def boot_id() -> str:
    """This machine's boot id (its host name where there is none)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            return file.read().strip()
    except OSError:  # not Linux: the host name will have to do
        return socket.gethostname()


def pid_namespace() -> str:
    """This process's PID namespace, as /proc names it ("" where it does not)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
