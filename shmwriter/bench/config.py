"""What ``shmwriter bench`` runs: :class:`BenchConfig`, light to import.

The command line builds its options from it without importing the benchmark
itself (:mod:`.suite` and the modules it uses), so the other commands never
load any of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from .._validate import check_count

__all__ = ["BLOCK_WRITERS", "DATA_ENV", "FILTERS", "MEMORY_SAMPLE_INTERVAL_S", "BenchConfig",
           "baseline_of"]

#: Environment variable naming the folder of the dcnum test data zip files (the tests use
#: it too); without it and without ``--data``, the events are synthetic.
DATA_ENV = "SHMWRITER_TESTDATA"
#: Filter settings: name -> label. Both add fletcher32; ``zstd5`` is shmwriter's default.
FILTERS: dict[str, str] = {
    "uncompressed": "uncompressed + fletcher32",
    "zstd5": "Zstd-5 + fletcher32",
}

#: Seconds between memory samples of the runs that measure memory (one per writer and
#: filter setting, and the memory-scaling runs); the timed runs sample none. A sample reads
#: the PSS of every process of the tree, which costs 8 to 13 ms of CPU here (page-table
#: walks): at 10 Hz, 5% of a 2-core machine, taken from writers that use both cores and not
#: from plain h5py, which leaves one idle. Peaks are compared across run lengths, and a run
#: of 6,000 frames lasts about a second: sampled rarely, it misses short peaks that a
#: ten-times-longer run catches. (A probe of the per-frame workload: the writer's peak PSS
#: at 6,000 frames was 156 MB sampled every 0.5 s and 178 MB every 0.02 s; at 60,000, 164
#: and 173.)
MEMORY_SAMPLE_INTERVAL_S = 0.02

#: Writers whose producers work through blocks of ``batch_frames`` consecutive frames (the
#: other workload deals frames to the producers in turn).
BLOCK_WRITERS = ("shmwriter-blocks", "shmwriter-batched", "shmwriter-frames", "dcnum-blocks")


def baseline_of(writer: str) -> str:
    """The dcnum writer of the same workload as ``writer``: its "x dcnum" baseline."""
    return "dcnum-blocks" if writer in BLOCK_WRITERS else "dcnum"


def _data_dir_from_env() -> str | None:
    return os.environ.get(DATA_ENV) or None


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchConfig:
    """What to run. Every field has a default that fits a 2-core machine in a few minutes."""

    frames: int = 6000
    """Frames per run (each has 0-3 events: about 9,200 events, 370 MB)."""
    producers: int = 2
    """Spawned producer processes for shmwriter and dcnum."""
    repeat: int = 3
    """Repetitions; the figures are their medians."""
    modes: tuple[Literal["thread", "process"], ...] = ("process", "thread")
    """shmwriter writer modes to run; the first also runs the descriptor-path and
    memory-scaling measurements (default: the Writer's default first)."""
    filters: tuple[str, ...] = ("uncompressed", "zstd5")
    """Filter settings to run (keys of :data:`FILTERS`)."""
    seed: int = 42
    """Seed of the workload."""
    data_dir: str | None = field(default_factory=_data_dir_from_env)
    """Folder of the dcnum test data zip files (default ``$SHMWRITER_TESTDATA``); synthetic
    events if None or absent."""
    workdir: str | None = None
    """Folder for the files written (default: a temporary folder)."""
    keep_files: bool = False
    """Keep the files written (one per writer, filter setting and repetition)."""
    overhead_frames: int = 100_000
    """Empty frames of the descriptor-path micro-benchmark (0 skips it). Enough that the
    run's fixed costs (starting the producer, closing the file: some 40 ms) stay a small part
    of the per-frame figure."""
    memory_scaling: bool = False
    """Also run :attr:`scaling_writers` once for each of :attr:`scaling_frames` and
    :attr:`filters`."""
    scaling_frames: tuple[int, ...] = (6000, 60000)
    """Frame counts of the memory-scaling runs."""
    write_threshold: int = 500
    """Frames per block, for every writer."""
    batch_frames: int = 100
    """Frames per block of the :data:`BLOCK_WRITERS` rows, whose producers work through
    blocks of that many frames: put frame by frame (``shmwriter-blocks``, ``dcnum-blocks``),
    with one ``put_many`` (``shmwriter-batched``) or filled in place with one ``frames()``
    (``shmwriter-frames``); 0 leaves those rows out."""

    def __post_init__(self) -> None:
        for name in ("frames", "producers", "repeat", "write_threshold"):
            check_count(name, getattr(self, name), minimum=1)
        check_count("overhead_frames", self.overhead_frames, minimum=0)
        check_count("batch_frames", self.batch_frames, minimum=0)
        for frames in self.scaling_frames:
            check_count("scaling_frames", frames, minimum=1)
        bad_modes = [m for m in self.modes if m not in ("thread", "process")]
        if bad_modes or not self.modes:
            raise ValueError(f"modes must be a non-empty tuple of 'thread' and 'process'; "
                             f"got {self.modes!r}")
        bad_filters = [f for f in self.filters if f not in FILTERS]
        if bad_filters or not self.filters:
            raise ValueError(f"filters must be a non-empty tuple of {sorted(FILTERS)}; "
                             f"got {self.filters!r}")

    @property
    def writers(self) -> tuple[str, ...]:
        """Writer names of the comparison, in the order they run."""
        blocks = BLOCK_WRITERS if self.batch_frames else ()
        return (*(f"shmwriter-{mode}" for mode in self.modes), "dcnum", *blocks, "h5py")

    @property
    def scaling_writers(self) -> tuple[str, ...]:
        """Writer names of the memory-scaling runs: the first mode's, the block rows but
        ``frames()``, and dcnum's of both workloads."""
        blocks = ("shmwriter-blocks", "shmwriter-batched") if self.batch_frames else ()
        return (f"shmwriter-{self.modes[0]}", *blocks, "dcnum")

    @property
    def runs_total(self) -> int:
        """Runs (and micro-benchmarks) this configuration makes."""
        return ((self.repeat + 1) * len(self.filters) * len(self.writers)  # + a memory run
                + 2 * bool(self.overhead_frames)  # one frame at a time, then in batches
                + (len(self.scaling_writers) * len(self.filters) * len(self.scaling_frames)
                   if self.memory_scaling else 0))
