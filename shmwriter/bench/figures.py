"""What the bench measured: one run's figures, the medians per writer, the whole result.

:class:`BenchResult` holds every run side by side (see :mod:`.suite`) and
derives the ratios the report prints.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import BenchConfig, baseline_of

__all__ = ["BenchResult", "OverheadFigures", "RunFigures", "WriterSummary"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunFigures:
    """What one run of one writer measured."""

    writer: str
    """``shmwriter-thread``, ``-process``, ``-blocks``, ``-batched``, ``-frames``, ``dcnum``,
    ``dcnum-blocks`` or ``h5py``."""
    filters: str
    """Key of :data:`FILTERS`."""
    repetition: int
    """0-based repetition (-1 for memory-scaling runs and the memory runs of the rows)."""
    frames: int
    """Frames of the run."""
    events: int
    """Events of the run (every writer gets the same)."""
    file_events: int
    """Events read back from the file written."""
    data_nbytes: int
    """Uncompressed bytes of the events."""
    file_nbytes: int
    """Size of the file written."""
    wall_s: float
    """Seconds from the start signal to the closed file."""
    cpu_s: float
    """CPU seconds of all processes involved in that time (startup excluded)."""
    writer_cpu_s: float
    """CPU seconds of the writer alone (see :attr:`writer_cpu_scope`)."""
    writer_cpu_scope: str
    """What :attr:`writer_cpu_s` covers."""
    producers_s: float | None
    """Seconds until the producers had handed over their last frame (None: no producers)."""
    baseline_memory_nbytes: int
    """Summed PSS of the process tree just before the start signal (all set up, idle)."""
    peak_memory_nbytes: int | None
    """Highest summed PSS of the process tree during the run; None in a timed run, which
    samples no memory (its row's memory run has the figure)."""
    monitor_cpu_s: float
    """CPU seconds of the sampling thread (not in the other CPU figures)."""
    image_chunks: tuple[int, ...]
    """Chunk shape of the file's image dataset."""
    image_filters: tuple[int, ...]
    """HDF5 filter ids of the file's image dataset."""
    path: str | None
    """The file written, if it was kept."""
    producers_cpu_s: float | None = None
    """CPU seconds of the producers from the start signal on (None: no producers)."""
    stage_cpu_s: dict[str, float] = field(default_factory=dict)
    """shmwriter's writer CPU seconds per stage (``Writer.stage_cpu_s``); {} for the others."""
    progress: tuple[tuple[float, int], ...] = field(repr=False)
    """Samples ``(seconds since the start, events handed to the file)``."""
    memory: tuple[tuple[float, int], ...] = field(default=(), repr=False)
    """Samples ``(seconds since the start, summed PSS)``; empty in a timed run."""

    @property
    def events_per_s(self) -> float:
        """Events per wall second."""
        return self.events / self.wall_s

    @property
    def mb_per_s(self) -> float:
        """Uncompressed event megabytes (1e6 bytes) per wall second."""
        return self.data_nbytes / 1e6 / self.wall_s

    @property
    def writer_cpu_s_per_gb(self) -> float:
        """Writer CPU seconds per GB (1e9 bytes) of event data."""
        return self.writer_cpu_s / (self.data_nbytes / 1e9)

    @property
    def peak_over_baseline_nbytes(self) -> int | None:
        """Peak memory above the idle, set-up process tree (None: not sampled)."""
        return None if self.peak_memory_nbytes is None else self.sampled_peak()[1]

    def sampled_peak(self) -> tuple[int, int]:
        """``(peak, peak over idle)`` of a run that measured memory.

        Raises
        ------
        ValueError
            If the run sampled no memory.
        """
        if self.peak_memory_nbytes is None:
            raise ValueError(f"the run of {self.writer} ({self.filters}) sampled no memory")
        return self.peak_memory_nbytes, max(0, self.peak_memory_nbytes
                                           - self.baseline_memory_nbytes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-type form (with the derived figures), for JSON."""
        data = asdict(self)
        data.update(events_per_s=self.events_per_s, mb_per_s=self.mb_per_s,
                    writer_cpu_s_per_gb=self.writer_cpu_s_per_gb,
                    peak_over_baseline_nbytes=self.peak_over_baseline_nbytes)
        return data


@dataclass(frozen=True, slots=True, kw_only=True)
class WriterSummary:
    """Medians over the repetitions of one writer and filter setting."""

    writer: str
    """Writer name."""
    filters: str
    """Filter setting."""
    repetitions: int
    """Runs the medians are over."""
    events: int
    """Events per run."""
    events_per_s: float
    """Median events per second."""
    mb_per_s: float
    """Median MB/s."""
    wall_s: float
    """Median wall seconds."""
    cpu_s: float
    """Median CPU seconds of all processes."""
    writer_cpu_s_per_gb: float
    """Median writer CPU seconds per GB."""
    writer_cpu_scope: str
    """What the writer CPU covers."""
    peak_memory_nbytes: int | None
    """Peak memory, from the row's memory run (None without one)."""
    peak_over_baseline_nbytes: int | None
    """Peak above the idle process tree, from the same run."""
    stage_cpu_s_per_gb: dict[str, float] = field(default_factory=dict)
    """Median CPU seconds per GB of each stage: ``producers`` and the writer's stages."""

    @classmethod
    def of(cls, runs: Sequence[RunFigures], memory_run: RunFigures | None) -> WriterSummary:
        """Medians of the timed ``runs`` (all of one writer and filter setting), with the
        peak memory of ``memory_run``."""
        def median(values: Iterator[float]) -> float:
            return float(statistics.median(values))
        first = runs[0]
        peak, over = memory_run.sampled_peak() if memory_run is not None else (None, None)
        return cls(writer=first.writer, filters=first.filters, repetitions=len(runs),
                   events=first.events,
                   events_per_s=median(r.events_per_s for r in runs),
                   mb_per_s=median(r.mb_per_s for r in runs),
                   wall_s=median(r.wall_s for r in runs), cpu_s=median(r.cpu_s for r in runs),
                   writer_cpu_s_per_gb=median(r.writer_cpu_s_per_gb for r in runs),
                   writer_cpu_scope=first.writer_cpu_scope,
                   peak_memory_nbytes=peak, peak_over_baseline_nbytes=over,
                   stage_cpu_s_per_gb=_stage_medians(runs))


def _stage_medians(runs: Sequence[RunFigures]) -> dict[str, float]:
    """Median CPU seconds per GB of the producers and of each writer stage."""
    if not runs[0].stage_cpu_s:
        return {}
    gb = runs[0].data_nbytes / 1e9
    stages = {"producers": [(r.producers_cpu_s or 0.0) / gb for r in runs]}
    for name in runs[0].stage_cpu_s:
        stages[name] = [r.stage_cpu_s.get(name, 0.0) / gb for r in runs]
    return {name: float(statistics.median(values)) for name, values in stages.items()}


@dataclass(frozen=True, slots=True, kw_only=True)
class OverheadFigures:
    """The descriptor path alone: one producer putting empty frames."""

    frames: int
    """Empty frames put."""
    mode: str
    """The writer's mode."""
    batch_frames: int
    """Frames per ``put_many`` call; 0: one ``put(i, None)`` per frame."""
    producer_us_per_frame: float
    """Microseconds per frame in the producer's loop."""
    producer_cpu_us_per_frame: float
    """Producer CPU microseconds per frame."""
    end_to_end_us_per_frame: float
    """Microseconds per frame from the start signal to the closed file."""
    writer_cpu_us_per_frame: float
    """Writer-thread CPU microseconds per frame."""


@dataclass(slots=True, kw_only=True)
class BenchResult:
    """Everything one ``shmwriter bench`` invocation measured."""

    config: BenchConfig
    """What was run."""
    workload: str
    """Where the events came from."""
    event_nbytes: int
    """Uncompressed bytes of one event."""
    machine: dict[str, Any]
    """CPU count, platform and library versions."""
    warnings: list[str] = field(default_factory=list)
    """Problems the report must show (missing dcnum, event counts that disagree)."""
    runs: list[RunFigures] = field(default_factory=list)
    """Every timed run of the comparison, in the order run."""
    memory_runs: list[RunFigures] = field(default_factory=list)
    """One more run of each writer and filter setting, which measures memory (the timed
    runs do not: see :data:`~.config.MEMORY_SAMPLE_INTERVAL_S`)."""
    overhead: OverheadFigures | None = None
    overhead_batched: OverheadFigures | None = None
    """The descriptor-path micro-benchmark."""
    scaling: list[RunFigures] = field(default_factory=list)
    """The memory-scaling runs."""

    def summaries(self) -> list[WriterSummary]:
        """Medians per filter setting and writer, in the order run."""
        groups: dict[tuple[str, str], list[RunFigures]] = {}
        for run in self.runs:
            groups.setdefault((run.filters, run.writer), []).append(run)
        return [WriterSummary.of(runs, self.memory_run(*key)) for key, runs in groups.items()]

    def memory_run(self, filters: str, writer: str) -> RunFigures | None:
        """The run of ``writer`` with ``filters`` that measured memory (None: there is none)."""
        return next((r for r in self.memory_runs if (r.filters, r.writer) == (filters, writer)),
                    None)

    def ratios(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{filters: {shmwriter writer: {figure: ratio}}}`` of the medians; "dcnum" is the
        dcnum writer of the same workload (:func:`~.config.baseline_of`)."""
        by_key = {(s.filters, s.writer): s for s in self.summaries()}
        ratios: dict[str, dict[str, dict[str, float]]] = {}
        for (filters, writer), summary in by_key.items():
            if not writer.startswith("shmwriter"):
                continue
            entry = ratios.setdefault(filters, {}).setdefault(writer, {})
            for other, base_writer in (("dcnum", baseline_of(writer)), ("h5py", "h5py")):
                if (filters, base_writer) in by_key:
                    base = by_key[filters, base_writer]
                    entry[f"events_per_s_vs_{other}"] = summary.events_per_s / base.events_per_s
                    entry[f"writer_cpu_per_gb_vs_{other}"] = (summary.writer_cpu_s_per_gb
                                                              / base.writer_cpu_s_per_gb)
        return ratios

    @property
    def consistent(self) -> bool:
        """Whether every run wrote (and the file holds) the expected number of events."""
        return all(r.file_events == r.events for r in self.all_runs())

    def all_runs(self) -> list[RunFigures]:
        """The timed runs, the memory runs and the memory-scaling runs."""
        return [*self.runs, *self.memory_runs, *self.scaling]

    def to_dict(self) -> dict[str, Any]:
        """All figures in plain types, for JSON."""
        return {
            "config": asdict(self.config), "workload": self.workload,
            "event_nbytes": self.event_nbytes, "machine": self.machine,
            "warnings": list(self.warnings), "consistent": self.consistent,
            "summaries": [asdict(s) for s in self.summaries()], "ratios": self.ratios(),
            "overhead": asdict(self.overhead) if self.overhead else None,
            "overhead_batched": asdict(self.overhead_batched) if self.overhead_batched else None,
            "runs": [r.to_dict() for r in self.runs],
            "memory_runs": [r.to_dict() for r in self.memory_runs],
            "scaling": [r.to_dict() for r in self.scaling],
            "scaling_ratios": self.scaling_ratios(),
        }

    def scaling_ratios(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{filters: {writer: ratios}}``: peak memory of the largest over the smallest
        scaling run."""
        ratios: dict[str, dict[str, dict[str, float]]] = {}
        for filters, writer in dict.fromkeys((r.filters, r.writer) for r in self.scaling):
            runs = sorted((r for r in self.scaling if (r.filters, r.writer) == (filters, writer)),
                          key=lambda r: r.frames)
            if len(runs) >= 2:
                (small, small_over), (large, large_over) = (runs[0].sampled_peak(),
                                                            runs[-1].sampled_peak())
                ratios.setdefault(filters, {})[writer] = {
                    "peak": large / small, "peak_over_baseline": large_over / max(small_over, 1)}
        return ratios

    def table(self) -> str:
        """The report: a Markdown table of the medians, then the extra figures."""
        from ._report import format_report
        return format_report(self)
