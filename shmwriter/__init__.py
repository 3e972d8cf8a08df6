"""shmwriter: many producer processes, one HDF5 (.rtdc) file, no array bytes through a pipe.

The data flow, module by module::

    _spec      Schema/Feature -> SlotLayout: where each feature sits in a slot
    _validate  the argument checks every constructor shares
    _rtdc      the .rtdc layout names: logs, attributes, image attributes, chunk rows
    _segment   the named shared-memory segment, reserved up front
    _ring      SlotRing: header + per-frame flags + slots in that segment
    _channel   per-producer pipes: descriptors in, slot grants out
    _attach    Ticket, attach: a producer joins a run from any process, pipes by SCM_RIGHTS
    _control   the messages between a Writer and its writer loop
    _events    the checks of a frame's events against the schema
    producer   Producer.put / .put_many / .frame / .frames: into slots, send a descriptor
    _run       RunConfig, RunResult: what the writer loop is given and reports back
    _channels  the writer's ends of the producers' channels
    _slots     SlotAllocator: which slot is free, granted or held
    _reorder   ReorderBuffer: frames back into frame order
    _ranges    FrameRanges: missing frames kept as ranges (one entry per gap)
    _gather    ChunkGatherer: write_threshold frames -> one chunk of arrays
    _assemble  FrameAssembler: reorder + gather, and when slots go back
    _sinkthread  SinkThread: chunks to the file from a bounded queue
    _h5sink    H5Sink: chunks -> /events datasets of the .rtdc file
    _codec     ChunkCodec: Zstd + fletcher32 of whole HDF5 chunks, in parallel
    _header    RunHeader: the run's state and figures in the ring header
    _loop      WriterLoop: passes events between the rooms above
    _entry     the writer process's entry point (or the writer thread's)
    writer     Writer: owns the run, hands out producers
    errors     the exceptions, each saying whose fault it was

Around the pipeline: ``_recover`` (a dead writer's file opens plainly), ``_stats``
(figures from the ring header), ``inspect`` and ``runs`` (the operator's commands),
``demo``, ``replay``, ``bench`` (the benchmark lab, a subpackage only ``shmwriter bench`` imports),
``cli`` (with ``_text`` for its tables); ``_memory`` (PSS of a process tree),
``_liveness`` (is a pid alive);
``eventqueue`` (with ``_queue_shared``) and ``compat`` give dcnum's queue-writer API on
top of the same ring and channel ideas.
"""

from __future__ import annotations

from ._attach import Ticket as Ticket
from ._attach import attach as attach
from ._ranges import FrameRanges as FrameRanges
from ._spec import Feature as Feature
from ._spec import Schema as Schema
from ._stats import RunStatistics as RunStatistics
from .errors import AttachError as AttachError
from .errors import BrokenError as BrokenError
from .errors import ClosedError as ClosedError
from .errors import FrameError as FrameError
from .errors import MissingFramesError as MissingFramesError
from .errors import QueueFullError as QueueFullError
from .errors import RingFullError as RingFullError
from .errors import ShmSpaceError as ShmSpaceError
from .errors import ShmWriterError as ShmWriterError
from .eventqueue import EventQueue as EventQueue
from .producer import Producer as Producer
from .writer import Writer as Writer

#: The version; pyproject.toml reads it from here, ``shmwriter --version`` prints it.
__version__ = "0.1.0"

__all__ = [
    "AttachError",
    "BrokenError",
    "ClosedError",
    "EventQueue",
    "Feature",
    "FrameError",
    "FrameRanges",
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
]
