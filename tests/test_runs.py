"""``shmwriter top`` and ``shmwriter clean`` through their real entry point, on live runs."""

from __future__ import annotations

import mmap
import multiprocessing
import os
import secrets
import signal
import struct
import subprocess
import sys
import time
from multiprocessing import resource_tracker

import posix_ipc
import pytest
from _cli_workers import SCHEMA, nevents_of, own_writer_until_killed, put_frames, put_until_stopped
from _cli_workers import shmwriter_cli as cli
from _cli_workers import shmwriter_json as cli_json

import shmwriter
from shmwriter._ring.ring import _PATH_OFFSET, RING_MAGIC, Field, State

CTX = multiprocessing.get_context("spawn")


def own_segment_names() -> set[str]:
    prefix = f"shmw_{os.getpid()}_"
    return {n for n in os.listdir("/dev/shm") if n.startswith(prefix)}


def run_of(doc: dict, path) -> dict:
    (run,) = [r for r in doc["runs"] if r["path"] == str(path)]
    return run


def wait_until(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout_s} s for {what}")
        time.sleep(0.02)


def test_top_shows_a_live_run_with_its_figures(tmp_path):
    """Frame 5 is held back: frames 0-4 are written, 6-9 wait, the file lags 5 frames."""
    path, go = tmp_path / "live.rtdc", CTX.Event()
    with shmwriter.Writer(path, SCHEMA, total_frames=20, slots=16, write_threshold=4,
                          flush_interval_s=0.1) as writer:
        (name,) = own_segment_names()
        plans = [([0, 1, 2, 3, 4], [5, *range(10, 15)]), ([6, 7, 8, 9], list(range(15, 20)))]
        workers = [CTX.Process(target=put_frames, args=(writer.producer(), first, go, second))
                   for first, second in plans]
        for worker in workers:
            worker.start()
        try:
            wait_until(lambda: (writer.statistics().written_frames,
                                writer.statistics().newest_frame) == (5, 9),
                       "frames 0-4 written and frame 9 received")
            writer_pid = writer.statistics().writer_pid
            doc = cli_json("top", "--once", "--interval", "0.3")
            text = cli("status", "--once", "--interval", "0.1")
        finally:
            go.set()
            for worker in workers:
                worker.join(60)
    assert all(w.exitcode == 0 for w in workers)

    assert doc["interval_s"] == 0.3
    run = run_of(doc, path)
    assert run["name"] == name and run["owner_pid"] == os.getpid()
    assert run["writer_pid"] == writer_pid != 0
    assert run["owner_alive"] is True and run["state"] == "RUNNING"
    assert (run["slots"], run["total_frames"]) == (16, 20)
    assert (run["written_frames"], run["frames_done"], run["newest_frame"]) == (5, 5, 9)
    assert run["written_events"] == sum(nevents_of(f) for f in range(5))
    assert run["lag_frames"] == 5
    assert run["producers_alive"] == 2
    assert run["write_queue_size"] == 0 and run["missing_frames"] == 0
    assert 0 <= run["slots_in_use"] <= 16
    assert run["ring_occupancy"] == run["slots_in_use"] / 16
    # nothing was written between the two snapshots: the rates are differences, not averages
    assert (run["events_per_s"], run["nbytes_per_s"], run["frames_per_s"]) == (0, 0, 0)
    assert run["error"] == ""

    assert text.returncode == 0, text.stderr
    (line,) = [row for row in text.stdout.splitlines() if row.endswith(str(path))]
    assert line.split()[:4] == [str(os.getpid()), "RUNNING", f"{run['slots_in_use']}/16",
                                f"{run['ring_occupancy']:.0%}"]
    assert line.split()[4:10] == ["5/20", "9", "0", "0.00", "0", "5"]

    # the run has ended: its segment is gone and top no longer lists it
    assert name not in os.listdir("/dev/shm")
    assert not [r for r in cli_json("top", "--once", "--interval", "0.1")["runs"]
                if r["path"] == str(path)]


def test_top_measures_the_rates_of_a_paced_run(tmp_path):
    path, stop = tmp_path / "paced.rtdc", CTX.Event()
    with shmwriter.Writer(path, SCHEMA, write_threshold=10, flush_interval_s=0.1) as writer:
        worker = CTX.Process(target=put_until_stopped, args=(writer.producer(), stop))
        worker.start()
        try:
            wait_until(lambda: writer.written_events > 0, "the first events written")
            run = run_of(cli_json("top", "--once", "--interval", "1"), path)
        finally:
            stop.set()
            worker.join(60)
    assert worker.exitcode == 0
    assert run["state"] == "RUNNING" and run["total_frames"] is None
    assert run["producers_alive"] == 1
    assert run["events_per_s"] > 0 and run["frames_per_s"] > 0 and run["nbytes_per_s"] > 0
    assert run["written_events"] <= writer.written_events


def test_top_without_a_terminal_refreshes_until_interrupted(tmp_path):
    with shmwriter.Writer(tmp_path / "w.rtdc", SCHEMA):
        script = os.path.join(os.path.dirname(sys.executable), "shmwriter")
        top = subprocess.Popen([script, "top", "--interval", "0.2"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        try:
            lines = []
            while sum("shmwriter top:" in line for line in lines) < 3:
                line = top.stdout.readline()
                assert line, top.stderr.read()
                lines.append(line)
        finally:
            top.send_signal(signal.SIGINT)
            _out, err = top.communicate(timeout=30)
    assert top.returncode == 0, err
    assert "\x1b[" not in "".join(lines)  # no screen control codes into a pipe
    assert any(line.rstrip().endswith("w.rtdc") for line in lines)


def test_top_argument_errors_are_one_line():
    for args, message in ((["--interval", "0"], "expected a positive number; got '0'"),
                          (["--json"], "--json prints one document and needs --once")):
        result = cli("top", *args)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and message in result.stderr


# -- clean ------------------------------------------------------------------------------


def craft_leftover(name_pid: int, header_pid: int | None = None, age_s: float = 0) -> str:
    """A segment as a run of ``name_pid`` leaves it: a valid header, owner-only."""
    name = f"shmw_{name_pid}_{secrets.token_hex(8)}"
    shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600, size=8192)
    try:
        with mmap.mmap(shm.fd, 8192) as header:
            for field, value in ((Field.MAGIC, RING_MAGIC), (Field.STATE, State.RUNNING),
                                 (Field.OWNER_PID, header_pid or name_pid),
                                 (Field.SLOTS, 1), (Field.TOTAL_FRAMES, -1),
                                 (Field.NEWEST_FRAME, -1)):
                struct.pack_into("<q", header, 8 * field, value)
            path = b"/data/leftover.rtdc"
            header[_PATH_OFFSET:_PATH_OFFSET + len(path)] = path
    finally:
        shm.close_fd()
    if age_s:
        then = time.time() - age_s
        os.utime(f"/dev/shm/{name}", (then, then))
    return name


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_clean_removes_leftovers_of_dead_owners_and_never_a_live_run(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    crafted: list[str] = []
    try:
        gone = dead_pid()
        dead = craft_leftover(gone)
        # the name's pid now runs a process younger than the segment: reused, so dead
        reused = craft_leftover(sleeper.pid, age_s=3600)
        # the header names a live owner although the name's pid is gone: keep it
        disputed = craft_leftover(gone, header_pid=os.getpid())
        crafted += [dead, reused, disputed]
        with shmwriter.Writer(tmp_path / "live.rtdc", SCHEMA):
            (live,) = own_segment_names()
            # as if the clock had jumped: the live owner now looks younger than its segment,
            # but it maps the segment, which settles it
            then = time.time() - 3600
            os.utime(f"/dev/shm/{live}", (then, then))

            dry = cli("clean", "--dry-run")
            assert dry.returncode == 0, dry.stderr
            lines = {word: line for line in dry.stdout.splitlines()
                     for word in line.split() if word.startswith("shmw_")}
            assert lines[dead].startswith(f"would remove {dead} ")
            assert f"owner pid {gone} is gone" in lines[dead]
            assert lines[reused].startswith(f"would remove {reused} ")
            assert f"owner pid {sleeper.pid} was reused" in lines[reused]
            assert lines[disputed].startswith(f"kept         {disputed} ")
            assert f"owner pid {os.getpid()} is alive" in lines[disputed]
            assert lines[live].startswith(f"kept         {live} ")
            assert f"owner pid {os.getpid()} is alive and maps the segment" in lines[live]
            assert all(os.path.exists(f"/dev/shm/{n}") for n in [*crafted, live])

            runs = {r["name"]: r for r in cli_json("top", "--once", "--interval", "0.1")["runs"]}
            assert runs[dead]["owner_alive"] is False and runs[live]["owner_alive"] is True

            # named, so that leftovers of other people's runs on this machine stay untouched
            done = cli("clean", dead, reused, disputed, live)
            assert done.returncode == 0, done.stderr
            assert f"removed      {dead} " in done.stdout
            assert f"removed      {reused} " in done.stdout
            assert "2 leftover segment(s), freed 16.4 kB; 2 live run(s) kept" in done.stdout
            assert not os.path.exists(f"/dev/shm/{dead}")
            assert not os.path.exists(f"/dev/shm/{reused}")
            assert os.path.exists(f"/dev/shm/{disputed}")
            assert os.path.exists(f"/dev/shm/{live}")
    finally:
        sleeper.kill()
        sleeper.wait()
        for name in crafted:
            try:
                posix_ipc.unlink_shared_memory("/" + name)
            except posix_ipc.ExistentialError:
                pass


def test_clean_removes_the_segment_of_a_sigkilled_owner(tmp_path):
    ours, theirs = CTX.Pipe()
    owner = CTX.Process(target=own_writer_until_killed,
                        args=(str(tmp_path / "killed.rtdc"), 3, theirs))
    owner.start()
    name = None
    try:
        assert ours.poll(60), "the owner never reported its segment"
        name = ours.recv()
        runs = {r["name"]: r for r in cli_json("top", "--once", "--interval", "0.1")["runs"]}
        assert runs[name]["owner_alive"] is True
        assert cli("clean", name).stdout.startswith(f"kept         {name} ")

        os.kill(owner.pid, signal.SIGKILL)
        owner.join(30)
        assert owner.exitcode == -signal.SIGKILL
        # the child shared our resource tracker, which unlinks only when we exit: it is left
        assert os.path.exists(f"/dev/shm/{name}")
        dry = cli("clean", "--dry-run")
        assert f"would remove {name} " in dry.stdout
        assert f"owner pid {owner.pid} is gone" in dry.stdout
        assert os.path.exists(f"/dev/shm/{name}")

        done = cli("clean", name)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"removed      {name} ")
        assert not os.path.exists(f"/dev/shm/{name}")
    finally:
        if owner.is_alive():
            owner.kill()
            owner.join()
        if name is not None:
            try:
                posix_ipc.unlink_shared_memory("/" + name)
            except posix_ipc.ExistentialError:
                pass
            # it is in our tracker's list (see above): forget it, or the tracker warns at exit
            resource_tracker.unregister("/" + name, "shared_memory")


def test_clean_of_an_unknown_segment_is_one_line():
    result = cli("clean", "shmw_1_0123456789abcdef")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "no run segment of this user named 'shmw_1_0123456789abcdef'" in result.stderr
