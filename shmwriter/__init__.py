"""shmwriter: many producer processes, one HDF5 (.rtdc) file, no array bytes through a pipe.

The data flow, room by room (each folder's docstring lists its modules)::

    _spec       Schema, Feature -> SlotLayout: where each feature's events sit in the ring
    _events     the checks of a frame's events against the schema, at the producer
    producer    Producer.put / put_many / frame / frames: into slots, then a descriptor
    _ring/      shared memory: the segment, the SlotRing over it, the header's figures
    _channel/   descriptor records and grants, tickets and attaching, control messages
    _write/     the writer: loop, slot allocator, reorder, gather, sink, codec, recover
    writer      Writer: owns a run, starts the writer, hands out producers and tickets
    merge       merge_runs: the files of a run written in parts, joined in frame order
    ray         RayWriter: one Writer per Ray node, merged on close (the extra shmwriter[ray];
                nothing else imports it)
    errors      the exceptions, each saying whose fault it was

Shared by the rooms: ``_validate`` (argument checks), ``_rtdc`` (the .rtdc layout names),
``_ranges`` (FrameRanges, missing frames as ranges), ``_blocks`` (BlockPlan: which part
writes which block of a run), ``_liveness`` (is a pid alive),
``_forks`` (a forked child closes its copies of the servers' and clients' pipes).

Beside the pipeline: ``eventqueue`` (with ``_queue/``: a hub on the Writer's protocol and
allocator) and ``compat`` give dcnum's queue-writer API; ``ops/`` holds what the operator's
commands do (inspect, status, top, clean, replay, demo); ``cli`` only parses and prints;
``bench`` is the benchmark lab, a subpackage only ``shmwriter bench`` imports.
"""

from __future__ import annotations

from ._channel.attach import Ticket as Ticket
from ._channel.attach import attach as attach
from ._ranges import FrameRanges as FrameRanges
from ._ring.stats import RunStatistics as RunStatistics
from ._spec import Feature as Feature
from ._spec import Schema as Schema
from .errors import AttachError as AttachError
from .errors import BrokenError as BrokenError
from .errors import ClosedError as ClosedError
from .errors import FrameError as FrameError
from .errors import MissingFramesError as MissingFramesError
from .errors import QueueFullError as QueueFullError
from .errors import RingFullError as RingFullError
from .errors import ShmSpaceError as ShmSpaceError
from .errors import ShmWriterError as ShmWriterError
from .eventqueue import EventLease as EventLease
from .eventqueue import EventQueue as EventQueue
from .eventqueue import EventReader as EventReader
from .merge import MergedPart as MergedPart
from .merge import merge_runs as merge_runs
from .producer import Producer as Producer
from .writer import Writer as Writer

#: The version; pyproject.toml reads it from here, ``shmwriter --version`` prints it.
__version__ = "0.1.0"

__all__ = [
    "AttachError",
    "BrokenError",
    "ClosedError",
    "EventLease",
    "EventQueue",
    "EventReader",
    "Feature",
    "FrameError",
    "FrameRanges",
    "MergedPart",
    "MissingFramesError",
    "Producer",
    "QueueFullError",
    "RingFullError",
    "RunStatistics",
    "Schema",
    "ShmSpaceError",
    "ShmWriterError",
    "Ticket",
    "Writer",
    "attach",
    "merge_runs",
]
