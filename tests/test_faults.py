"""Faults really produced: killed producers and writers, a full file system, forged descriptors."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import dclab
import h5py
import numpy as np
import psutil
import pytest
from _workers import (
    SCHEMA,
    events_of,
    expected_arrays,
    put_frames,
    put_then_die,
    put_until_broken,
    wait_until,
    write_until_disk_full,
)

import shmwriter
from shmwriter._channel.records import Kind, encode_record

CTX = multiprocessing.get_context("spawn")


def shm_entries() -> set[str]:
    """Run segments owned by this process (other test runs may share /dev/shm)."""
    return {name for name in os.listdir("/dev/shm") if name.startswith(f"shmw_{os.getpid()}_")}


def test_killed_producer_loses_only_its_own_frames(tmp_path):
    """A producer SIGKILLed while holding every slot: its slots come back, the run goes on."""
    path, frames, producers = tmp_path / "out.rtdc", 240, 3
    shares = [list(range(k, frames, producers)) for k in range(producers)]
    before = shm_entries()
    with pytest.raises(shmwriter.MissingFramesError) as info:
        with shmwriter.Writer(path, SCHEMA, total_frames=frames, slots=3, slot_events=2,
                              write_threshold=25) as writer:
            # the dying producer holds all 3 slots (a 6-event frame) when it is killed:
            # the others can only finish if the writer takes those slots back
            dying = CTX.Process(target=put_then_die, args=(writer.producer(), shares[1], 3, 10, 6))
            dying.start()
            dying.join(30)
            assert dying.exitcode == -signal.SIGKILL
            workers = [CTX.Process(target=put_frames, args=(writer.producer(), share))
                       for share in (shares[0], shares[2])]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(60)
                assert worker.exitcode == 0
    lost = shares[1][10:]
    assert info.value.missing_frames == lost
    assert writer.missing_frames == lost
    delivered = sorted(set(range(frames)) - set(lost))
    with h5py.File(path) as h5:
        for name, array in expected_arrays(delivered).items():
            np.testing.assert_array_equal(h5["events"][name][:], array, err_msg=name)
    assert shm_entries() <= before


def test_killed_writer_process(tmp_path):
    """Producers get BrokenError at once; the file opens and holds every flushed chunk."""
    path, frames = tmp_path / "out.rtdc", 2000
    writer = shmwriter.Writer(path, SCHEMA, total_frames=frames, slots=4, write_threshold=10,
                              mode="process", timeout_s=20)
    producer = writer.producer()
    waiting = CTX.Process(target=put_until_broken, args=(writer.producer(),
                                                         list(range(1000, frames))))
    waiting.start()  # fills the ring with frames ahead of the frontier, then waits
    for frame in range(300):
        producer.put(frame, events_of(frame))
    deadline = time.monotonic() + 20
    while writer.written_frames < 300 and time.monotonic() < deadline:
        time.sleep(0.02)
    flushed = writer.written_frames
    assert flushed >= 300
    os.kill(writer.statistics().writer_pid, signal.SIGKILL)
    with pytest.raises(shmwriter.BrokenError, match="the writer died"):
        for frame in range(300, 1000):
            producer.put(frame, events_of(frame))
    waiting.join(30)
    assert waiting.exitcode == 42  # it got BrokenError, not a hang or another error
    with pytest.raises(shmwriter.BrokenError, match=r"writer process died \(exit code -9\)"):
        writer.close()
    with h5py.File(path, "r") as h5:  # a plain open: no repair tool needed
        expected = expected_arrays(range(flushed))
        stored = h5["events"]["area"][:len(expected["area"])]
        np.testing.assert_array_equal(stored, expected["area"])
        np.testing.assert_array_equal(h5["events"]["image"][:len(expected["area"])],
                                      expected["image"])
    with dclab.new_dataset(str(path)) as ds:
        assert len(ds) >= len(expected["area"])


def test_full_file_system_stops_the_run(tmp_path):
    """Writing fails (a size-limited file): the error reaches close() and the producer."""
    path, report = tmp_path / "out.rtdc", CTX.Queue()
    child = CTX.Process(target=write_until_disk_full, args=(str(path), 1_000_000, 20000, report))
    child.start()
    outcome = report.get(timeout=120)
    child.join(30)
    assert child.exitcode == 0
    assert outcome["put"] is not None and outcome["put"].startswith("BrokenError")
    assert outcome["close"].startswith("BrokenError: the run failed: ")
    assert "File too large" in outcome["close"] or "write" in outcome["close"]
    flushed = outcome["written_frames"]
    assert flushed > 0
    with h5py.File(path, "r") as h5:  # a plain open: the writer made the file readable
        expected = expected_arrays(range(flushed))["area"]
        np.testing.assert_array_equal(h5["events"]["area"][:len(expected)], expected)


def test_forged_descriptors_are_refused(tmp_path, caplog):
    """Descriptors naming foreign slots or bad frames are refused; the run goes on."""
    caplog.set_level(logging.ERROR, logger="shmwriter")
    path = tmp_path / "out.rtdc"
    with shmwriter.Writer(path, SCHEMA, total_frames=21, slots=4, slot_events=2) as writer:
        forger, honest = writer.producer(), writer.producer()
        forger.put(0, events_of(0))  # says HELLO; its slots are known to the writer
        forged = [
            encode_record(Kind.FRAME, 1, 2, [99]),         # slot outside the ring
            encode_record(Kind.FRAME, 1, 2, [3]),          # slot never granted to it
            encode_record(Kind.FRAME, 1, 9, []),           # events without slots
            encode_record(Kind.FRAME, 500, 0, []),         # frame out of range
            encode_record(Kind.FRAME, 0, 0, []),           # duplicate frame
        ]
        for record in forged:
            os.write(forger._link.desc_fd, record)
        for frame in range(1, 19):
            honest.put(frame, events_of(frame))
        os.write(forger._link.desc_fd, encode_record(77))   # unknown kind: the forger is refused
        with pytest.raises(shmwriter.BrokenError, match="refused this producer: producer 0 sent "
                                                         "a record of unknown kind 77"):
            forger.put(19, events_of(19), timeout_s=10)  # has events: it must ask for a slot
        honest.put(19, events_of(19))
        honest.put(20, events_of(20))
        stats = writer.statistics()
        forger.close()
        honest.close()
    assert stats.rejected_frames == 5
    messages = "\n".join(record.getMessage() for record in caplog.records)
    assert "slots [99] were not granted" in messages
    assert "frame index out of range" in messages
    assert "duplicate frame index" in messages
    with h5py.File(path) as h5:
        np.testing.assert_array_equal(h5["events"]["area"][:], expected_arrays(range(21))["area"])


def test_killed_owner(tmp_path):
    """The process that owns the Writer dies: the writer process closes the file, producers
    get BrokenError, and the segment goes once every process of the run is gone."""
    path = tmp_path / "out.rtdc"
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import _workers; "
              "_workers.own_a_run_then_wait(sys.argv[2], 100000)")
    owner = subprocess.Popen([sys.executable, "-c", script, os.path.dirname(__file__), str(path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    writer_pid, child_pid = map(int, owner.stdout.readline().split())
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait(10)
    for pid in (writer_pid, child_pid):
        assert wait_until(lambda pid=pid: not psutil.pid_exists(pid)), f"pid {pid} still runs"
    with h5py.File(path, "r") as h5:  # closed by the writer process: a plain open works
        frames = np.unique(h5["events"]["frame"][:])
        assert frames[-1] >= 99  # at least what the owner put itself
        np.testing.assert_array_equal(h5["events"]["area"][:],
                                      expected_arrays(range(frames[-1] + 1))["area"])
    prefix = f"shmw_{owner.pid}_"
    assert wait_until(lambda: not any(n.startswith(prefix) for n in os.listdir("/dev/shm")))



_UNGUARDED_SCRIPT = """\
import sys
import shmwriter
# no `if __name__ == "__main__":`: the spawned writer process runs this again and dies
try:
    shmwriter.Writer(sys.argv[1], shmwriter.Schema({"area": shmwriter.Feature("int64")}),
                     total_frames=1, mode="process", timeout_s=20)
except shmwriter.BrokenError as exc:
    print(f"BrokenError: {exc}")
"""
_KILLED_WHILE_WRITING = """\
import os, signal, sys
import h5py
h5 = h5py.File(sys.argv[1], "w", libver="latest")
h5.create_dataset("x", data=[1, 2, 3])
h5.swmr_mode = True
h5.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("existing", ["none", "left by a killed writer"])
def test_writer_dying_before_its_file_leaves_the_path_alone(tmp_path, existing):
    """A writer process that dies before it creates its file (here: a script without a main
    guard, which the spawned process runs again) must not touch a file already at the
    path, nor warn about one that is not there."""
    path = tmp_path / "out.rtdc"
    if existing != "none":
        killed = subprocess.run([sys.executable, "-c", _KILLED_WHILE_WRITING, str(path)],
                                capture_output=True, timeout=60)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
    before = path.read_bytes() if path.exists() else None
    script = tmp_path / "unguarded.py"
    script.write_text(_UNGUARDED_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(path)], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "BrokenError: the writer could not start: the writer process died" in result.stdout
    assert "could not clear the write flags" not in result.stderr
    assert (path.read_bytes() if path.exists() else None) == before


def test_killed_writer_over_an_old_file_still_leaves_a_readable_file(tmp_path):
    """The other side of the check above: a file already at the path that the writer replaced
    is its own once it started, and is repaired when it is killed."""
    path = tmp_path / "out.rtdc"
    killed = subprocess.run([sys.executable, "-c", _KILLED_WHILE_WRITING, str(path)],
                            capture_output=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    writer = shmwriter.Writer(path, SCHEMA, total_frames=1000, write_threshold=10,
                              mode="process", timeout_s=20)
    producer = writer.producer()
    for frame in range(100):
        producer.put(frame, events_of(frame))
    assert wait_until(lambda: writer.written_frames >= 100)
    os.kill(writer.statistics().writer_pid, signal.SIGKILL)
    with pytest.raises(shmwriter.BrokenError, match=r"writer process died \(exit code -9\)"):
        writer.close()
    with h5py.File(path, "r") as h5:  # a plain open: the write flags were cleared
        expected = expected_arrays(range(100))["area"]
        np.testing.assert_array_equal(h5["events"]["area"][:len(expected)], expected)
