"""Ray tasks and a gate actor for tests/test_ray.py (imported by the cluster's workers)."""

from __future__ import annotations

import asyncio
import os
import signal

import ray
from _workers import events_of

import shmwriter

#: Longest wait of a gate: no test waits on a dead peer for long.
GATE_TIMEOUT_S = 60.0


@ray.remote(num_cpus=0)
class Gate:
    """Tasks report at the gate; the driver waits there until enough of them have."""

    def __init__(self) -> None:
        self.arrived = 0
        self.changed, self.opened = asyncio.Event(), asyncio.Event()

    async def arrive(self) -> None:
        self.arrived += 1
        self.changed.set()

    async def wait_for(self, count: int) -> int:
        async with asyncio.timeout(GATE_TIMEOUT_S):
            while self.arrived < count:
                self.changed.clear()
                await self.changed.wait()
        return self.arrived

    async def open(self) -> None:
        self.opened.set()

    async def wait_open(self) -> None:
        async with asyncio.timeout(GATE_TIMEOUT_S):
            await self.opened.wait()


@ray.remote(num_cpus=1, max_retries=0)
def put_block(writer, block, skip=(), *, gate=None, stop_after=None, how="stall"):
    """Put ``block``'s frames by their run index; after ``stop_after`` of them, die by
    SIGKILL, or report at ``gate`` and go on once it opens (if its node still lives)."""
    with writer.producer() as producer:
        for count, frame in enumerate(block, 1):
            if frame not in skip:
                producer.put(frame, events_of(frame))
            if count == stop_after:
                if how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                ray.get(gate.arrive.remote())
                ray.get(gate.wait_open.remote())
    return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=1, max_retries=0)
def put_foreign_frame(writer, block, frame):
    """Put ``frame`` (of another node's block), then ``block`` itself; return the error."""
    with writer.producer() as producer:
        try:
            producer.put(frame, events_of(frame))
        except shmwriter.FrameError as exc:
            error = exc
        try:
            producer.put(block.start, {"bad": 1})
        except shmwriter.FrameError as exc:
            bad_events = exc
        for frame in block:
            producer.put(frame, events_of(frame))
    return str(error), error.frame_index, str(bad_events), bad_events.frame_index
