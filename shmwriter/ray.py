"""RayWriter: one Writer per Ray node, frames through each node's ring, one merged file.

Frames never travel through Ray. Each node runs a writer actor (pinned to the
node) that owns a :class:`~shmwriter.Writer` with its ring in that node's
/dev/shm. The run's frames are cut into blocks; block ``b`` belongs to node
``b mod N`` (a :class:`~shmwriter._blocks.BlockPlan`). A task placed on a
block's node (:meth:`RayWriter.placement`) attaches a producer by that node's
ticket and puts the block's frames by their run index; the node's Writer
numbers them as its own. :meth:`RayWriter.close` ends every node's run and
merges the parts into one .rtdc in run order (:func:`shmwriter.merge.merge_runs`).

This module is the optional extra ``shmwriter[ray]``: nothing else in
shmwriter imports it, or Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import psutil
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ._blocks import PART_LOG, BlockPlan
from ._channel.attach import Ticket, attach, boot_id, pid_namespace
from ._events import EventArrays
from ._ranges import FrameRanges
from ._spec import Schema
from ._write.h5sink import seal_killed_file
from .errors import FrameError, MissingFramesError
from .merge import merge_runs, read_part
from .ops.runs import clean_leftovers
from .producer import Producer
from .writer import Writer

__all__ = ["NodePart", "NodeProducer", "RayWriter"]

logger = logging.getLogger(__name__)

#: Longest wait for a node's writer to start, and for a lost writer's process to end.
_START_TIMEOUT_S, _LOST_TIMEOUT_S = 120.0, 60.0


@dataclass(frozen=True, slots=True)
class NodePart:
    """One node's part of a merged run."""

    node_id: str
    """The Ray node that wrote it."""
    path: str
    """Its part file (removed after the merge unless ``keep_parts``)."""
    frames: int
    """Frames of its blocks."""
    events: int
    """Events it holds."""
    missing_frames: FrameRanges
    """Its frames that never came (run indices); all of them if its part was lost."""


@dataclass(frozen=True, slots=True)
class _Run:
    """What a task needs of the run: the plan, the nodes and their tickets (picklable)."""

    plan: BlockPlan
    nodes: tuple[str, ...]
    tickets: tuple[Ticket, ...]


class RayWriter:
    """Writes one .rtdc file from producers on many Ray nodes, one Writer per node.

    Parameters
    ----------
    path
        The merged .rtdc file (replaced if it exists).
    schema
        The features of every event.
    total_frames
        Frames of the run, ``0 .. total_frames - 1``.
    frames_per_block
        Frames of each block; block ``b`` is written on node ``b mod len(nodes)``.
    nodes
        Ray node ids to write on (default: every alive node, in ``ray.nodes()``'s order).
    parts_dir
        Folder for the nodes' part files (default: ``<path>.parts`` beside ``path``).
        Every node must see it at the same path: on a real cluster, a shared filesystem.
    keep_parts
        Keep the part files after the merge.
    allow_gaps
        If False, :meth:`close` raises :class:`~shmwriter.MissingFramesError` when
        frames never came (they are recorded in the merged file either way).
    **writer_options
        The :class:`~shmwriter.Writer`'s own options (``slots``, ``write_threshold``,
        ``hdf5_dataset_kwargs``, ``metadata``, ``logs``, ``timeout_s``, ...), the same for
        every node.

    Raises
    ------
    RuntimeError
        If Ray is not initialized.
    ValueError
        If an argument is invalid or a node id is not an alive node.

    Notes
    -----
    Use it as a context manager on the driver. The handle pickles into tasks
    (as the plan, the node ids and the nodes' tickets); in a task,
    :meth:`producer` attaches to the writer of the task's node. Only the
    driver's handle closes the run.

    If a task dies mid-block, its frames not put are missing. If a node's
    writer actor dies, or its node is lost, its Writer process (if it is still
    running) writes what it was sent and closes the part; the ring is removed
    on that node, and the frames the part lacks are recorded missing.
    """

    _owner = False
    _closed = False
    _merge_s = 0.0
    _parts: tuple[NodePart, ...] | list[NodePart] = ()
    _missing = FrameRanges()

    def __init__(self, path: str | os.PathLike[str], schema: Schema, *, total_frames: int,
                 frames_per_block: int, nodes: Sequence[str] | None = None,
                 parts_dir: str | os.PathLike[str] | None = None, keep_parts: bool = False,
                 allow_gaps: bool = False, **writer_options: Any) -> None:
        if not ray.is_initialized():
            raise RuntimeError("RayWriter needs Ray: call ray.init() first")
        for name in ("total_frames", "allow_gaps", "path", "schema"):
            if name in writer_options:
                raise TypeError(f"RayWriter sets {name!r} of each node's Writer itself")
        index = writer_options.get("index_feature", "frame")
        if index is None or index in schema:
            raise ValueError(f"RayWriter needs the frame index the Writer derives to put the "
                             f"nodes' blocks back in order; index_feature={index!r} gives "
                             f"none (the schema has its own {index!r}, or it is None)")
        node_ids = _check_nodes(nodes)
        plan = BlockPlan(total_frames=total_frames, frames_per_block=frames_per_block,
                         parts=len(node_ids))
        self.path = os.fspath(path)
        self.parts_dir = os.fspath(parts_dir or f"{self.path}.parts")
        self.schema, self.keep_parts, self.allow_gaps = schema, keep_parts, allow_gaps
        self._owner = True
        os.makedirs(self.parts_dir, exist_ok=True)
        logs = dict(writer_options.pop("logs", None) or {})
        self._logs = logs
        # what an empty stand-in part needs to match the others' datasets and attributes
        self._file_options = {key: writer_options[key] for key in
                              ("hdf5_dataset_kwargs", "metadata", "index_feature", "slot_events")
                              if key in writer_options}
        actor_class = ray.remote(_NodeWriter)
        self._actors: list[Any] = []
        try:
            for part, node in enumerate(node_ids):
                options = {**writer_options,
                           "logs": {**logs, PART_LOG: plan.log_lines(part)}}
                self._actors.append(actor_class.options(
                    num_cpus=0, max_restarts=0, max_task_retries=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                ).remote(self._part_path(part), schema, plan.part_frames(part), options))
            started = self._await_start(node_ids)
        except BaseException:
            self._discard_start()
            raise
        self._run = _Run(plan, tuple(node_ids), tuple(ticket for ticket, _, _ in started))
        #: each node's Writer process (pid and start time, None in thread mode) and ring
        self._writer_processes = [(process, ring) for _, process, ring in started]

    def _await_start(self, nodes: Sequence[str],
                     ) -> list[tuple[Ticket, tuple[int, float] | None, str]]:
        """Each node's ticket, Writer process and ring, once every node has started.

        Raises RuntimeError naming the first node whose Writer could not start, and
        TimeoutError naming one that did not start in time."""
        calls = [actor.started.remote() for actor in self._actors]
        ready, _ = ray.wait(calls, num_returns=len(calls), timeout=_START_TIMEOUT_S)
        started = []
        for part, call in enumerate(calls):
            node = nodes[part]
            if call not in ready:
                raise TimeoutError(f"the writer of node {node} (part {part}) did not start "
                                   f"within {_START_TIMEOUT_S} s")
            try:
                started.append(ray.get(call))
            except ray.exceptions.RayActorError as exc:
                reason = next((line.strip() for line in reversed(str(exc).splitlines())
                               if line.strip()), type(exc).__name__)
                raise RuntimeError(f"the writer of node {node} (part {part}) could not start: "
                                   f"{reason}") from exc
        return started

    def _discard_start(self) -> None:
        """After a start that failed: end the nodes' Writers that started (their rings
        removed, their parts deleted), then their actors."""
        ends = [actor.abort.remote() for actor in self._actors]
        ray.wait(ends, num_returns=len(ends), timeout=_START_TIMEOUT_S)
        for actor in self._actors:
            ray.kill(actor)
        for part in range(len(self._actors)):
            with contextlib.suppress(OSError):  # never made, or not a file of ours
                os.unlink(self._part_path(part))
        with contextlib.suppress(OSError):  # the user's files may be in it too
            os.rmdir(self.parts_dir)

    @classmethod
    def _in_task(cls, run: _Run) -> RayWriter:
        """The handle as a task sees it: it attaches producers but does not own the run."""
        handle = cls.__new__(cls)
        handle._run = run
        return handle

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self)._in_task, (self._run,))

    # -- the tasks' side ------------------------------------------------------------
    @property
    def nodes(self) -> tuple[str, ...]:
        """The node ids that write, in part order."""
        return self._run.nodes

    @property
    def total_frames(self) -> int:
        """Frames of the run."""
        return self._run.plan.total_frames

    def blocks(self) -> Iterator[range]:
        """The frames of each block, in run order."""
        return self._run.plan.blocks()

    def node_of(self, block: range | int) -> str:
        """The node id that writes ``block`` (a range from :meth:`blocks`, or its number)."""
        return self._run.nodes[self._part_of(block)]

    def placement(self, block: range | int) -> dict[str, Any]:
        """Ray options that run a task on ``block``'s node: ``f.options(**placement)``."""
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(self.node_of(block),
                                                                      soft=False)}

    def producer(self) -> NodeProducer:
        """A producer attached to the writer of this task's node.

        Raises
        ------
        ValueError
            If no writer of this run runs on this task's node.
        AttachError, ClosedError, TimeoutError
            As :func:`shmwriter.attach` raises them.
        """
        node = ray.get_runtime_context().get_node_id()
        if node not in self._run.nodes:
            raise ValueError(f"this task runs on node {node}, where no writer of this run "
                             f"runs; start it with writer.placement(block)")
        part = self._run.nodes.index(node)
        return NodeProducer(attach(self._run.tickets[part]), self._run, part)

    def _part_of(self, block: range | int) -> int:
        plan = self._run.plan
        if isinstance(block, range):
            if not block or block.start >= plan.total_frames or block.start < 0:
                raise ValueError(f"block {block!r} holds no frame of the run's "
                                 f"{plan.total_frames}")
            return plan.part_of(block.start)
        return plan.block(block).start // plan.frames_per_block % plan.parts

    # -- the driver's side ------------------------------------------------------------
    @property
    def parts(self) -> list[NodePart]:
        """Each node's part, once the run is closed."""
        return list(self._parts)

    @property
    def merge_s(self) -> float:
        """Seconds :meth:`close` spent merging the parts (0 before)."""
        return self._merge_s

    @property
    def missing_frames(self) -> FrameRanges:
        """The frames that never came, once the run is closed."""
        return self._missing

    def close(self, timeout_s: float | None = None) -> None:
        """End every node's run, then merge the parts into :attr:`path`.

        Parameters
        ----------
        timeout_s
            Longest wait for the nodes' runs to end, all at once (None: as long as
            producers live).

        Raises
        ------
        MissingFramesError
            If frames never came and ``allow_gaps`` is False (the merged file is
            complete otherwise).
        RuntimeError
            If called on a task's copy of the handle.
        """
        self._end(abort=False, timeout_s=timeout_s)
        if self._missing and not self.allow_gaps:
            raise MissingFramesError(self._missing)

    def abort(self) -> None:
        """Stop every node's run now, then merge what they wrote."""
        self._end(abort=True, timeout_s=None)

    def _end(self, *, abort: bool, timeout_s: float | None) -> None:
        if not self._owner:
            raise RuntimeError("only the driver's RayWriter ends the run; a task's copy "
                               "puts frames only")
        if self._closed:
            return
        self._closed = True
        paths, first_error = [], None
        # every node ends at once (a close takes up to timeout_s in all, not per node),
        # and every node is ended, whatever one of them raised
        ends = [actor.abort.remote() if abort else actor.close.remote(timeout_s)
                for actor in self._actors]
        for part, (actor, end) in enumerate(zip(self._actors, ends, strict=True)):
            try:
                ray.get(end)
            except ray.exceptions.RayActorError as exc:  # its node lost, or the actor killed
                logger.warning("the writer of node %s is gone (%s); its part is taken as "
                               "far as it was flushed", self._run.nodes[part],
                               type(exc).__name__)
                self._finish_lost(part)
            except Exception as exc:  # its Writer's close raised; it has closed its file
                first_error = first_error or exc
            finally:
                ray.kill(actor)
            paths.append(self._readable_part(part))
        started = time.perf_counter()
        merged = merge_runs(self.path, paths)
        self._merge_s = time.perf_counter() - started
        self._parts = [NodePart(node, place.path, place.frames, place.events,
                                place.missing_frames)
                       for node, place in zip(self._run.nodes, merged, strict=True)]
        self._missing = FrameRanges().union(span for place in merged
                                            for span in place.missing_frames.spans)
        if not self.keep_parts:
            for path in paths:
                os.unlink(path)
            with contextlib.suppress(OSError):  # the user's files may be in it too
                os.rmdir(self.parts_dir)
        if first_error is not None:
            raise first_error

    def _part_path(self, part: int) -> str:
        stem = os.path.splitext(os.path.basename(self.path))[0]
        return os.path.join(self.parts_dir, f"{stem}.part{part}.rtdc")

    def _finish_lost(self, part: int) -> None:
        """Wait for a lost writer's process to close its part, then remove its ring.

        On this host the driver does it; on another, a task on that node (if the
        node is alive: a lost machine took its /dev/shm with it)."""
        process, ring = self._writer_processes[part]
        ticket = self._run.tickets[part]
        if (ticket.host, ticket.pid_namespace) == (boot_id(), pid_namespace()):
            _finish_writer_process(process, ring)
            return
        finish = ray.remote(_finish_writer_process).options(
            num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
                self._run.nodes[part], soft=False))
        try:
            ray.get(finish.remote(process, ring), timeout=_LOST_TIMEOUT_S + 10)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            logger.warning("could not finish the lost writer of node %s: %s",
                           self._run.nodes[part], exc)

    def _readable_part(self, part: int) -> str:
        """The part's file once its writer has ended, sealed as an aborted run's if the
        writer was killed (the frames after its last flush are then missing). If it left
        no file a merge takes, that file is kept aside as ``*.unmerged`` and an empty
        aborted part stands in (all its frames missing)."""
        path, plan = self._part_path(part), self._run.plan
        logs = {**self._logs, PART_LOG: plan.log_lines(part)}
        try:
            seal_killed_file(path, total_frames=plan.part_frames(part), logs=logs,
                             reason=f"the writer of node {self._run.nodes[part][:12]} was "
                                    f"lost")
            read_part(path)
            return path
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("part %d (%s) cannot be merged (%s); its frames are missing",
                           part, path, exc)
        if os.path.exists(path):
            os.replace(path, f"{path}.unmerged")
        with Writer(path, self.schema, total_frames=plan.part_frames(part), mode="thread",
                    logs=logs, **self._file_options) as writer:
            writer.abort()
        return path

    def __enter__(self) -> RayWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self.abort()
            except Exception:  # the caller's exception matters more
                logger.exception("ending the Ray run after an error failed")

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (f"<RayWriter {self._run.plan.total_frames} frames on "
                f"{len(self._run.nodes)} nodes ({state})>")


class NodeProducer:
    """A producer on one node: puts frames of that node's blocks by their run index.

    Get it from :meth:`RayWriter.producer` in a task; close it when done (or use
    ``with``). It has :class:`~shmwriter.Producer`'s ``put``, ``put_many`` and ``frame``;
    a frame of another
    node's block raises :class:`~shmwriter.FrameError` naming that node.
    """

    def __init__(self, producer: Producer, run: _Run, part: int) -> None:
        self._producer, self._run, self._part = producer, run, part

    @property
    def node_id(self) -> str:
        """The node whose writer this producer feeds."""
        return self._run.nodes[self._part]

    def put(self, frame_index: int, events: EventArrays | None, *,
            timeout_s: float | None = None) -> None:
        """Put one frame of this node's blocks (see :meth:`shmwriter.Producer.put`)."""
        with self._named(frame_index):
            self._producer.put(self._local(frame_index), events, timeout_s=timeout_s)

    def put_many(self, frames: Sequence[int] | npt.NDArray[np.integer[Any]],
                 nevents: Sequence[int] | npt.NDArray[np.integer[Any]],
                 events: EventArrays | None, *, timeout_s: float | None = None) -> None:
        """Put a batch of this node's frames (see :meth:`shmwriter.Producer.put_many`)."""
        local = [self._local(frame) for frame in frames]
        with self._named(None):
            self._producer.put_many(local, nevents, events, timeout_s=timeout_s)

    @contextlib.contextmanager
    def frame(self, frame_index: int, nevents: int, *, timeout_s: float | None = None,
              ) -> Iterator[dict[str, np.ndarray[Any, Any]]]:
        """Fill a frame in place (see :meth:`shmwriter.Producer.frame`)."""
        with self._named(frame_index), self._producer.frame(
                self._local(frame_index), nevents, timeout_s=timeout_s) as arrays:
            yield arrays

    def close(self) -> None:
        """Tell the node's writer this producer is done. Idempotent."""
        self._producer.close()

    def __enter__(self) -> NodeProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _local(self, frame: object) -> int:
        """The node's index of run frame ``frame``; refuses a frame of another node."""
        plan = self._run.plan
        if isinstance(frame, bool) or not isinstance(frame, int | np.integer) \
                or not 0 <= frame < plan.total_frames:
            raise FrameError(f"frame index must be an int in 0..{plan.total_frames - 1}; "
                             f"got {frame!r}", frame_index=frame)
        part = plan.part_of(int(frame))
        if part != self._part:
            block = int(frame) // plan.frames_per_block
            raise FrameError(f"frame {frame} is in block {block}, which node "
                             f"{self._run.nodes[part]} writes, not this node "
                             f"{self.node_id}: run the block's task with "
                             f"writer.placement(block)", frame_index=frame)
        return plan.to_part(int(frame))

    @contextlib.contextmanager
    def _named(self, frame: int | None) -> Iterator[None]:
        """Errors of the node's producer, which names its own frame index, name the run's."""
        try:
            yield
        except FrameError as exc:
            local = exc.frame_index
            if frame is None and isinstance(local, int | np.integer):
                frame = self._run.plan.to_run(self._part, int(local))
            raise FrameError(f"run frame {frame} (frame {local} of node {self.node_id}'s "
                             f"part): {exc}", frame_index=frame, feature=exc.feature) from exc


class _NodeWriter:
    """The actor on one node: owns that node's Writer."""

    def __init__(self, path: str, schema: Schema, total_frames: int,
                 options: Mapping[str, Any]) -> None:
        self._writer = Writer(path, schema, total_frames=total_frames, allow_gaps=True,
                              **options)

    def started(self) -> tuple[Ticket, tuple[int, float] | None, str]:
        """The node's ticket, the Writer process (pid and start time; None for a
        thread) and the ring's name."""
        pid = getattr(self._writer._worker, "pid", None)
        process = None if pid is None else (pid, psutil.Process(pid).create_time())
        ring = self._writer._ring
        return self._writer.ticket(), process, ring.spec.name if ring is not None else ""

    def close(self, timeout_s: float | None) -> None:
        self._writer.close(timeout_s)

    def abort(self) -> None:
        self._writer.abort()


def _finish_writer_process(writer: tuple[int, float] | None, ring: str) -> None:
    """Wait (bounded) for a Writer process whose owner died to close its file, then
    remove its ring if nobody did. ``writer`` is its pid and start time: a pid taken
    since by another process is neither waited for nor killed."""
    if writer is not None:
        pid, started = writer
        with contextlib.suppress(psutil.NoSuchProcess):
            process = psutil.Process(pid)
            if process.create_time() != started:
                raise psutil.NoSuchProcess(pid)  # the writer ended; its pid is reused
            try:
                process.wait(_LOST_TIMEOUT_S)
            except psutil.TimeoutExpired:
                logger.warning("the writer process %d did not end in %s s; killing it",
                               pid, _LOST_TIMEOUT_S)
                process.kill()
    with contextlib.suppress(FileNotFoundError):
        clean_leftovers([ring])


def _check_nodes(nodes: Sequence[str] | None) -> list[str]:
    alive = [node["NodeID"] for node in ray.nodes()  # type: ignore[no-untyped-call]
             if node["Alive"]]
    if nodes is None:
        return alive
    if isinstance(nodes, str):
        raise TypeError("nodes must be a sequence of node ids, not one string")
    chosen = list(nodes)
    if not chosen:
        raise ValueError("nodes must name at least one node")
    for node in chosen:
        if node not in alive:
            raise ValueError(f"nodes: {node!r} is not an alive Ray node; alive: {alive}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"nodes names a node twice: {chosen}")
    return chosen

