"""Spawned-process workers and helpers for the command-line tests (inspect, top, clean)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

import shmwriter

SCHEMA = shmwriter.Schema({
    "image": shmwriter.Feature("uint8", (8, 8)),
    "x": shmwriter.Feature("float64"),
})


def nevents_of(frame: int) -> int:
    """1 to 3 events per frame."""
    return 1 + frame % 3


def events_of(frame: int) -> dict[str, np.ndarray]:
    """The events of ``frame``: values derived from the frame index."""
    n = nevents_of(frame)
    return {"image": np.full((n, 8, 8), frame % 256, np.uint8),
            "x": frame + np.arange(n) / 10}


def put_frames(producer: shmwriter.Producer, first: list[int], go, second: list[int]) -> None:
    """Put ``first``, wait until ``go`` is set, put ``second``, close."""
    with producer:
        for frame in first:
            producer.put(frame, events_of(frame))
        if not go.wait(60):
            raise TimeoutError("the test never said go")
        for frame in second:
            producer.put(frame, events_of(frame))


def put_until_stopped(producer: shmwriter.Producer, stop) -> None:
    """Put frames 0, 1, 2, ... one every 5 ms until ``stop`` is set, then close."""
    with producer:
        frame = 0
        while not stop.is_set():
            producer.put(frame, events_of(frame))
            frame += 1
            time.sleep(0.005)


def own_writer_until_killed(path: str, frames: int, conn) -> None:
    """Own a Writer, write ``frames`` frames, send the segment name, wait to be killed.

    The writer runs in a thread of this process, so killing the process kills the
    writer too (a writer process would close the file cleanly when its owner dies).
    """
    writer = shmwriter.Writer(path, SCHEMA, total_frames=frames + 100, write_threshold=5,
                              flush_interval_s=0.1, mode="thread")
    producer = writer.producer()
    for frame in range(frames):
        producer.put(frame, events_of(frame))
    while writer.written_frames < frames:
        time.sleep(0.02)
    prefix = f"shmw_{os.getpid()}_"
    (name,) = [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    conn.send(name)
    time.sleep(120)


def shmwriter_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the installed ``shmwriter`` command (its console script, next to this Python)."""
    script = os.path.join(os.path.dirname(sys.executable), "shmwriter")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "shmwriter"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout)


def shmwriter_json(*args: str) -> dict:
    """Run ``shmwriter ... --json`` and parse what it prints."""
    result = shmwriter_cli(*args, "--json")
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)
