"""Soak test: a paced acquisition for N minutes, printing memory over time.

Two spawned producers put frames of the demo measurement at a fixed total
rate (like a camera) into an open-ended run. Every ``--every`` seconds one line
shows the frames written, the lag of the file behind the producers, and the
memory of the whole process tree (sum of PSS, which counts the shared-memory
ring once) plus the run's /dev/shm segment. It must stay flat.

    python tools/soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time

import psutil

import shmwriter
from shmwriter.ops.demo import DEMO_METADATA, DEMO_SCHEMA, demo_events
from shmwriter.ops.memory import TreeMemory


def paced_producer(producer: shmwriter.Producer, frames: range, rate_hz: float) -> None:
    """Put ``frames`` at ``rate_hz``, like a camera, then close."""
    pool = [demo_events(i) for i in range(64)]  # generating images is not what we measure
    start = time.monotonic()
    with producer:
        for n, frame in enumerate(frames):
            time.sleep(max(0.0, start + n / rate_hz - time.monotonic()))  # the camera's clock
            producer.put(frame, pool[frame % len(pool)])


def shm_nbytes() -> int:
    """Bytes of this process's run segments in /dev/shm (their names hold our pid)."""
    total, prefix = 0, f"shmw_{os.getpid()}_"
    for name in os.listdir("/dev/shm"):
        if name.startswith(prefix):
            total += os.stat(os.path.join("/dev/shm", name)).st_blocks * 512
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=200.0, help="frames per second, total")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between lines")
    parser.add_argument("--mode", choices=("thread", "process"), default="process")
    parser.add_argument("--output", help="file to write (default: a temporary file, removed)")
    args = parser.parse_args()

    path = args.output or os.path.join(tempfile.mkdtemp(prefix="shmwriter-soak-"), "soak.rtdc")
    memory = TreeMemory()
    ctx = multiprocessing.get_context("spawn")
    total = int(args.rate * 60 * args.minutes)
    print(f"soak: {args.minutes} min at {args.rate:.0f} frames/s, writer in a {args.mode}, "
          f"file {path}")
    print(f"{'t/s':>7} {'frames':>9} {'events':>9} {'lag':>6} {'ring':>5} "
          f"{'PSS MB':>8} {'shm MB':>7} {'file MB':>8}")
    samples = []
    with shmwriter.Writer(path, DEMO_SCHEMA, metadata=DEMO_METADATA, mode=args.mode) as writer:
        workers = [ctx.Process(target=paced_producer,
                               args=(writer.producer(), range(k, total, 2), args.rate / 2))
                   for k in range(2)]
        for worker in workers:
            worker.start()
        t0 = time.monotonic()
        next_line = t0 + args.every
        while any(w.is_alive() for w in workers):
            workers[0].join(min(1.0, max(0.0, next_line - time.monotonic())))
            pss = memory.sample()
            if time.monotonic() >= next_line:
                next_line += args.every
                stats = writer.statistics()
                samples.append(pss)
                print(f"{time.monotonic() - t0:7.0f} {stats.written_frames:9d} "
                      f"{stats.written_events:9d} {stats.lag_frames:6d} "
                      f"{stats.slots_in_use:2d}/{stats.slots:<2d} {pss / 1e6:8.1f} "
                      f"{shm_nbytes() / 1e6:7.1f} {os.path.getsize(path) / 1e6:8.1f}",
                      flush=True)
    if samples:
        half = len(samples) // 2
        first, second = samples[:max(half, 1)], samples[half:]
        print(f"memory (PSS of all processes): min {min(samples) / 1e6:.1f} MB, max "
              f"{max(samples) / 1e6:.1f} MB, peak seen {memory.peak_nbytes / 1e6:.1f} MB; mean of "
              f"first half {sum(first) / len(first) / 1e6:.1f} MB, second half "
              f"{sum(second) / len(second) / 1e6:.1f} MB")
    print(f"wrote {writer.written_frames} frames, {writer.written_events} events; "
          f"host memory available {psutil.virtual_memory().available / 1e9:.1f} GB")
    if not args.output:
        os.remove(path)
        os.rmdir(os.path.dirname(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
