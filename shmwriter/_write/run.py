"""A run's terms and outcome: what the writer loop is given, and what it reports back.

The Writer's arguments are checked here too, as they become the run's terms.

:class:`RunConfig` pickles into the writer process; :class:`RunResult` comes
back over the control socket. :func:`run_log_lines` are the lines of the run
log ``/logs/shmwriter-run`` that tell a reader of the file how the run ended.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .._channel.attach import Ticket
from .._ranges import FrameRanges
from .._ring.ring import MAX_SLOTS, RingSpec, State
from .._rtdc import LOG_LINE_LIMIT
from .._spec import Schema, SlotLayout
from .._validate import check_positive_int, check_seconds

_PAGE_NBYTES = 4096

__all__ = ["RunConfig", "RunResult", "check_directory", "check_run_args", "default_reorder_budget",
           "derived_features", "describe_failure", "ring_slots", "run_log_lines"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """Everything the writer loop needs; it pickles into a writer process."""

    path: str
    """The .rtdc file to write."""
    ring: RingSpec
    """The ring to attach to."""
    ticket: Ticket
    """The run's ticket: the loop listens at its address and checks its secret."""
    write_threshold: int
    """Frames per chunk."""
    flush_interval_s: float
    """Longest time gathered frames wait before they are written."""
    hdf5_dataset_kwargs: Mapping[str, Any] | None
    """Overrides of the dataset creation keywords."""
    metadata: Mapping[str, Any]
    """Root attributes."""
    derived: tuple[str, ...]
    """Per-event features the writer adds."""
    reorder_budget_nbytes: int
    """Most bytes of out-of-order frames copied out of the ring."""
    prefetch: int
    """Extra slots granted ahead to a producer while a quarter of the ring stays free."""
    logs: Mapping[str, list[str]] = field(default_factory=dict)
    """Logs to add to the file at the end."""
    log_level: int = logging.WARNING
    """Level of the ``shmwriter`` logger in the process that made the Writer."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    """How a run ended, sent from the loop to the Writer."""

    state: State
    """DONE, FAILED or ABORTED."""
    written_events: int
    """Events in the file."""
    written_frames: int
    """Frames whose events are in the file (missing frames not counted)."""
    missing_frames: FrameRanges
    """Frames that never arrived (in an aborted run: gaps below the newest frame received)."""
    rejected_frames: int
    """Descriptors the writer refused (duplicates, forged or malformed)."""
    error: str | None = None
    """What went wrong, for FAILED; why, for ABORTED."""
    stage_cpu_s: Mapping[str, float] = field(default_factory=dict)
    """CPU seconds the writer spent in each stage (see ``Writer.stage_cpu_s``)."""


def run_log_lines(*, state: State, total_frames: int | None, frames_done: int,
                  written_frames: int, missing_frames: int, rejected_frames: int,
                  reason: str | None = None, error: str | None = None) -> list[str]:
    """The lines of the run log: how the run ended, for readers of the file.

    ``reason`` says why an ABORTED run was aborted, ``error`` what made a
    FAILED run fail. Every line fits dclab's limit of 100 characters.
    """
    total = "open-ended" if total_frames is None else total_frames
    lines = [f"state={state.name}", f"total_frames={total}", f"frames_done={frames_done}",
             f"written_frames={written_frames}", f"missing_frames={missing_frames}",
             f"rejected_frames={rejected_frames}"]
    if state is State.ABORTED:
        lines.append(f"reason={reason}")
    if state is State.FAILED:
        lines.append(f"error={error}")
    return [_fit(line) for line in lines]


def _fit(line: str) -> str:
    """``line`` cut to dclab's log line limit (counted in bytes, so it also fits the block)."""
    raw = line.encode("utf-8")
    if len(raw) <= LOG_LINE_LIMIT:
        return line
    return raw[:LOG_LINE_LIMIT - 3].decode("utf-8", "ignore") + "..."


def describe_failure(exc: BaseException) -> str:
    """One line naming what went wrong, the errno's text first (HDF5's messages bury it)."""
    text = " ".join(str(exc).split())
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code > 0:
        return f"{os.strerror(code)} ({type(exc).__name__}: {text})"
    return f"{type(exc).__name__}: {text}"


# -- the Writer's arguments, checked and turned into the run's terms -----------------------
def default_reorder_budget(spec: RingSpec) -> int:
    """The reorder budget: the ring's size, and at least a page per slot (small events)."""
    return max(spec.ring_nbytes, spec.slots * _PAGE_NBYTES)


def ring_slots(slots: int, memory_budget_nbytes: int | None, layout: SlotLayout) -> int:
    """The ring's slot count from the Writer's ``slots`` or ``memory_budget_nbytes`` (checked)."""
    if memory_budget_nbytes is not None:
        budget = check_positive_int("memory_budget_nbytes", memory_budget_nbytes)
        # exact: the slots region, block padding included, never exceeds the budget
        slots = min(layout.slots_that_fit(budget), MAX_SLOTS)  # small events: many fit
        if slots < 1:
            raise ValueError(f"memory_budget_nbytes={budget} cannot hold one slot of "
                             f"{layout.region_nbytes(1)} bytes; raise it or lower slot_events")
    slots = check_positive_int("slots", slots)
    if slots > MAX_SLOTS:
        raise ValueError(f"slots must be at most {MAX_SLOTS}; got {slots}")
    return slots


def check_run_args(total_frames: int | None, write_threshold: int, flush_interval_s: float,
                    mode: str, timeout_s: float) -> None:
    """Check the Writer's run arguments; the error names the argument."""
    if total_frames is not None:
        check_positive_int("total_frames", total_frames)
    check_positive_int("write_threshold", write_threshold)
    check_seconds("flush_interval_s", flush_interval_s)
    check_seconds("timeout_s", timeout_s)
    if mode not in ("thread", "process"):
        raise ValueError(f"mode must be 'thread' or 'process'; got {mode!r}")


def check_directory(path: str) -> None:
    """Raise FileNotFoundError unless the directory of ``path`` exists."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path!r}: directory {directory!r} does not exist")


def derived_features(schema: Schema, index_feature: str | None) -> tuple[str, ...]:
    """The per-event features the writer adds (the frame index unless the schema has it)."""
    if index_feature not in (None, "frame", "index_unmapped"):
        raise ValueError(f"index_feature must be 'frame', 'index_unmapped' or None; "
                         f"got {index_feature!r}")
    if index_feature is None or index_feature in schema:
        return ("nevents",)
    return (index_feature, "nevents")
