"""Attaching by ticket: scripts started by hand (subprocess), forged and stale tickets,
a producer killed right after attaching, a producer pickled with plain pickle."""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest
from _workers import SCHEMA, events_of, expected_arrays, wait_until

import shmwriter

HERE = os.path.dirname(__file__)


def script(call: str, payload: object) -> subprocess.Popen[str]:
    """``python -c`` running ``_attach_workers.<call>`` with ``payload`` pickled on argv."""
    code = f"import sys; sys.path.insert(0, {HERE!r}); import _attach_workers as w; w.{call}"
    argument = base64.b64encode(pickle.dumps(payload)).decode()
    return subprocess.Popen([sys.executable, "-c", code, argument], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_scripts_started_by_subprocess_attach_by_ticket_and_write(tmp_path, mode):
    path, frames = tmp_path / "out.rtdc", 300
    with shmwriter.Writer(path, SCHEMA, total_frames=frames, slots=6, write_threshold=25,
                          mode=mode) as writer:
        ticket = writer.ticket()
        scripts = [script(f"attach_and_put({k}, {frames}, 2)", ticket) for k in range(2)]
        for process in scripts:
            out, err = process.communicate(timeout=120)
            assert process.returncode == 0, err
            assert out.strip() == "done"
    with h5py.File(path, "r") as h5:
        for name, array in expected_arrays(range(frames)).items():
            np.testing.assert_array_equal(h5["events"][name][:], array, err_msg=name)


def test_a_ticket_pickles_small_without_descriptors_or_its_secret_in_repr(tmp_path):
    with shmwriter.Writer(tmp_path / "out.rtdc", SCHEMA, total_frames=1) as writer:
        ticket = writer.ticket()
        assert pickle.loads(pickle.dumps(ticket)) == ticket
        assert len(pickle.dumps(ticket)) < 2000
        assert ticket.secret not in repr(ticket)
        with writer.producer() as producer:
            producer.put(0, None)


def test_a_forged_ticket_is_refused_logged_and_leaves_the_run_alone(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="shmwriter")
    path, frames = tmp_path / "out.rtdc", 40
    with shmwriter.Writer(path, SCHEMA, total_frames=frames) as writer:
        forged = dataclasses.replace(writer.ticket(), secret="00" * 32)
        with pytest.raises(shmwriter.AttachError, match="wrong secret"):
            shmwriter.attach(forged)
        with shmwriter.attach(writer.ticket()) as producer:
            for frame in range(frames):
                producer.put(frame, events_of(frame))
    assert writer.written_frames == frames and writer.missing_frames == []
    assert any("refused to attach" in r.getMessage() and "wrong secret" in r.getMessage()
               for r in caplog.records)


def test_a_ticket_for_another_host_or_pid_namespace_says_so(tmp_path):
    with shmwriter.Writer(tmp_path / "out.rtdc", SCHEMA, total_frames=1,
                          allow_gaps=True) as writer:
        ticket = writer.ticket()
        with pytest.raises(shmwriter.AttachError, match="a run on another host"):
            shmwriter.attach(dataclasses.replace(ticket, host="another-machine"))
        with pytest.raises(shmwriter.AttachError, match="another PID namespace"):
            shmwriter.attach(dataclasses.replace(ticket, pid_namespace="pid:[1]"))


def test_the_ticket_of_an_ended_run_raises_closed_error_at_once(tmp_path):
    with shmwriter.Writer(tmp_path / "out.rtdc", SCHEMA, total_frames=1) as writer:
        ticket = writer.ticket()
        with writer.producer() as producer:
            producer.put(0, None)
    started = time.monotonic()
    with pytest.raises(shmwriter.ClosedError, match="has ended"):
        shmwriter.attach(ticket)
    assert time.monotonic() - started < 5  # a bound on a hang, not a speed figure
    with pytest.raises(shmwriter.ClosedError):
        writer.ticket()


def test_attaching_once_close_was_called_is_refused(tmp_path):
    """An open-ended run ends when its attached producers are done, after close()."""
    path = tmp_path / "out.rtdc"
    writer = shmwriter.Writer(path, SCHEMA, allow_gaps=True)
    ticket = writer.ticket()
    holder = script("attach_and_wait()", ticket)  # holds the run open until it is done
    assert holder.stdout.readline().strip() == "attached"
    closing = threading.Thread(target=writer.close, kwargs={"timeout_s": 60})
    closing.start()  # waits for the holder
    refusal = None
    for _ in range(100):  # close() tells the loop at once; an attach racing it may get in
        try:
            shmwriter.attach(ticket).close()
        except shmwriter.ClosedError as exc:
            refusal = str(exc)
            break
    holder.communicate(input="", timeout=60)  # it closes; then the run ends
    closing.join(60)
    assert not closing.is_alive() and writer.closed
    assert refusal is not None and "no longer takes producers" in refusal, refusal


def test_a_producer_killed_right_after_attaching_is_noticed_at_once(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="shmwriter")
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, SCHEMA, allow_gaps=True) as writer:
        victim = script("attach_and_wait()", writer.ticket())
        assert victim.stdout.readline().strip() == "attached"
        assert wait_until(lambda: writer.statistics().producers_alive == 1, 10.0, 0.005)
        killed = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        assert wait_until(lambda: writer.statistics().producers_alive == 0, 10.0,
                          0.005), "death unnoticed"
        noticed_s = time.monotonic() - killed
    # the writer saw the end of file of the dead process's only copy of its pipe
    assert any(f"(pid {victim.pid}) went away without closing" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    print(f"noticed {noticed_s * 1000:.1f} ms after the SIGKILL")


def test_a_producer_pickled_with_plain_pickle_attaches_where_it_is_unpickled(tmp_path):
    """As a Ray or Dask task receives it: no multiprocessing authentication involved."""
    path, frames = tmp_path / "out.rtdc", 30
    with shmwriter.Writer(path, SCHEMA, total_frames=frames) as writer:
        producer = writer.producer()
        remote = script(f"unpickle_producer_and_put(0, {frames})", producer)
        out, err = remote.communicate(timeout=120)
        assert remote.returncode == 0, err
        assert out.strip() == "done"
    with h5py.File(path, "r") as h5:
        np.testing.assert_array_equal(h5["events"]["area"][:],
                                      expected_arrays(range(frames))["area"])


def test_silent_peers_on_the_attach_socket_delay_nobody(tmp_path):
    """Peers that connect and say nothing are dropped after a while; meanwhile the writer
    loop and honest producers go on (the attach socket has a thread of its own)."""
    path, frames = tmp_path / "out.rtdc", 200
    with shmwriter.Writer(path, SCHEMA, total_frames=frames) as writer:
        address = "\0" + writer.ticket().address
        silent = []
        for _ in range(40):  # before: 0.5 s each, one after the other, in the writer loop
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            peer.connect(address)
            silent.append(peer)
        try:
            with shmwriter.attach(writer.ticket(), timeout_s=5) as producer:
                for frame in range(frames):
                    producer.put(frame, events_of(frame), timeout_s=5)
        finally:
            for peer in silent:
                peer.close()
    assert writer.written_frames == frames


def test_many_producers_attaching_at_once_all_get_in(tmp_path):
    path, frames = tmp_path / "out.rtdc", 300
    with shmwriter.Writer(path, SCHEMA, total_frames=frames, slots=64) as writer:
        ticket, errors = writer.ticket(), []
        together = threading.Barrier(frames)

        def put_one(frame: int) -> None:
            together.wait(60)  # more at once than the socket's backlog held before
            try:
                with shmwriter.attach(ticket, timeout_s=60) as producer:
                    producer.put(frame, events_of(frame))
            except Exception as exc:  # collected: the test names them all
                errors.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=put_one, args=(frame,)) for frame in range(frames)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert errors == []
    assert writer.written_frames == frames


OTHER_USER = """
import socket, sys
peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
peer.settimeout(5)
peer.connect("\\0" + sys.argv[1])
print(peer.recv(1024)[1:].decode())
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="running a peer as another user needs root")
def test_another_users_peer_is_refused_before_anything_is_read(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="shmwriter")
    with shmwriter.Writer(tmp_path / "out.rtdc", SCHEMA, total_frames=1) as writer:
        result = subprocess.run(["/usr/bin/python3", "-c", OTHER_USER,
                                 writer.ticket().address], user=65534,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "user 65534 is not the run's user"
        with writer.producer() as producer:
            producer.put(0, None)
    assert any("refused to attach" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_attaching_while_the_run_ends_gives_closed_error_only(tmp_path, mode):
    """Attaches racing the end of the run: each gets in or gets ClosedError, nothing else."""
    writer = shmwriter.Writer(tmp_path / "out.rtdc", SCHEMA, allow_gaps=True, mode=mode)
    ticket, outcomes, stop = writer.ticket(), [], threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                shmwriter.attach(ticket, timeout_s=30).close()
                outcomes.append("in")
            except shmwriter.ClosedError:
                outcomes.append("closed")
                return
            except Exception as exc:  # collected: the test names them all
                outcomes.append(f"{type(exc).__name__}: {exc}")
                return

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    writer.close(timeout_s=60)
    stop.set()
    for thread in threads:
        thread.join(60)
    assert set(outcomes) <= {"in", "closed"}, [o for o in outcomes if o not in ("in", "closed")]


def test_a_peer_slow_to_say_hello_is_still_served(tmp_path):
    """A process among hundreds of threads may wait long for its GIL between its connect
    and its hello (this made 9 of 300 busy attaches fail): a second is no reason to drop it."""
    from shmwriter._channel.attach import _HELLO, _MAGIC
    with shmwriter.Writer(tmp_path / "out.rtdc", SCHEMA, total_frames=1) as writer:
        ticket = writer.ticket()
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as peer:
            peer.settimeout(30)
            peer.connect("\0" + ticket.address)
            time.sleep(1.5)  # the slow peer: connected, not yet heard
            peer.sendall(_HELLO.pack(_MAGIC, bytes.fromhex(ticket.secret)))
            reply, fds, _, _ = socket.recv_fds(peer, 1024, 2)
        for fd in fds:
            os.close(fd)
        assert reply[:1] == b"K" and len(fds) == 2, reply
        with writer.producer() as producer:
            producer.put(0, None)
