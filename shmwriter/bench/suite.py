"""The side-by-side runs: shmwriter against dcnum's writer and plain h5py, and the report.

Every writer gets the same events (see :mod:`shmwriter.bench._work`): about
40 KB per event, 0-3 events per frame, from real images when the dcnum test
data are there. For each writer and filter setting it measures, from the
start signal to the closed file:

- events/s and MB/s (uncompressed event bytes per wall second);
- CPU seconds of every process involved, and of the writer alone;
- peak memory: the summed PSS of the process tree (PSS counts shared memory
  once), in one more run of each writer and filter setting, sampled every
  :data:`~.config.MEMORY_SAMPLE_INTERVAL_S`; the timed runs sample none, as
  sampling takes CPU from the writers that use every core.

The writers are

``shmwriter-thread``, ``shmwriter-process``
    :class:`shmwriter.Writer` end to end, with spawned producers putting frame by
    frame, dealt to them in turn.
``dcnum``
    dcnum's ``QueueWriterThread`` fed by spawned producers through an
    ``mp.Queue``, as dcnum's pipeline feeds it (or, without dcnum, an
    equivalent pickling writer; the report then says so).
``shmwriter-blocks``
    the Writer in process mode, producers working through blocks of
    ``batch_frames`` consecutive frames (dealt to them in turn), frame by frame.
``shmwriter-batched``
    the same blocks, each put with one ``put_many``.
``shmwriter-frames``
    the same blocks, each filled in place in the ring with ``Producer.frames``.
``dcnum-blocks``
    dcnum's writer, its producers working through the same blocks: the
    baseline of the block rows.
``h5py``
    plain h5py writing the same arrays from memory in one process, with the
    same chunks and filters: the limit.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import multiprocessing
import os
import platform
import shutil
import tempfile
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import h5py
import psutil

from . import _run as runner
from . import _work as work
from .config import BenchConfig
from .figures import BenchResult, OverheadFigures, RunFigures, WriterSummary

__all__ = ["BenchResult", "OverheadFigures", "RunFigures", "WriterSummary", "dcnum_warning",
           "median_runs", "run_bench", "write_json", "write_plot"]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
_CTX = multiprocessing.get_context("spawn")
_T = TypeVar("_T")
#: How the producers of each shmwriter block row put a block.
_BLOCK_WAYS: dict[str, Literal["put", "put_many", "frames"]] = {
    "shmwriter-blocks": "put", "shmwriter-batched": "put_many", "shmwriter-frames": "frames"}
#: Frames per put_many call in the batched descriptor-path micro-benchmark.
_OVERHEAD_BATCH_FRAMES = 100


def dcnum_warning() -> str | None:
    """None if dcnum's ``QueueWriterThread`` can be imported, else the warning to show."""
    try:
        from dcnum.write import QueueWriterThread  # noqa: F401
    except ImportError as exc:
        return (f"dcnum is not installed ({exc}); the 'dcnum' rows use shmwriter.bench's own "
                "pickling writer instead (pip install 'shmwriter[bench]' for the real one)")
    return None


# -- figures ---------------------------------------------------------------------------------
def _in_fresh_process(function: Callable[..., _T], *args: Any) -> _T:
    """``function(*args)`` in a new (spawned) process; its result or its error comes back.

    Every run gets a fresh interpreter as the root of its process tree, so no
    run inherits another's heap, imports or threads: the memory figures of
    the writers start from the same idle tree.
    """
    receive, send = _CTX.Pipe(duplex=False)
    process = _CTX.Process(target=_call_and_send, args=(send, function, *args),
                           name="shmwriter-bench-run")
    process.start()
    send.close()
    try:
        ok, value = receive.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"the benchmark run died (exit code {process.exitcode})") from None
    finally:
        receive.close()
    process.join()
    if not ok:
        raise RuntimeError(f"the benchmark run failed:\n{value}")
    result: _T = value
    return result


def _call_and_send(send: Any, function: Callable[..., Any], *args: Any) -> None:
    try:
        value = (True, function(*args))
    except BaseException:  # reported to the parent, which raises
        value = (False, traceback.format_exc())
    send.send(value)
    send.close()


def _measure(writer: str, job: runner.Job, repetition: int, keep: bool) -> RunFigures:
    """One run, in a fresh process of its own (see :func:`_in_fresh_process`)."""
    return _in_fresh_process(_measure_here, writer, job, repetition, keep)


def _measure_here(writer: str, job: runner.Job, repetition: int, keep: bool) -> RunFigures:
    if writer in ("shmwriter-blocks", "shmwriter-batched", "shmwriter-frames"):
        measured = runner.run_shmwriter_blocks(job, _BLOCK_WAYS[writer])
    elif writer.startswith("shmwriter-"):
        mode: Literal["thread", "process"] = (
            "process" if writer == "shmwriter-process" else "thread")
        measured = runner.run_shmwriter(job, mode)
    elif writer in ("dcnum", "dcnum-blocks"):
        measured = runner.run_dcnum(job, blocks=writer == "dcnum-blocks")
    else:
        measured = runner.run_h5py(job)
    events = int(job.workload.frame_nevents(job.frames).sum())
    file_events, chunks, filters = runner.read_back(job.path)
    window = measured.window
    figures = RunFigures(
        writer=writer, filters=job.filters, repetition=repetition, frames=job.frames,
        events=events, file_events=file_events,
        data_nbytes=events * work.BENCH_SCHEMA.event_nbytes,
        file_nbytes=job.path.stat().st_size, wall_s=window.wall_s, cpu_s=measured.cpu_s,
        writer_cpu_s=measured.writer_cpu_s, writer_cpu_scope=measured.writer_cpu_scope,
        producers_s=measured.producers_s, baseline_memory_nbytes=window.baseline_nbytes,
        peak_memory_nbytes=window.peak_nbytes, monitor_cpu_s=window.monitor_cpu_s,
        image_chunks=chunks, image_filters=filters, path=str(job.path) if keep else None,
        producers_cpu_s=(sum(r.cpu_end_s - r.cpu_start_s for r in measured.producer_reports)
                         if measured.producer_reports else None),
        stage_cpu_s=dict(measured.stage_cpu_s), progress=tuple(window.progress),
        memory=tuple(window.memory))
    if not keep:
        job.path.unlink()
    logger.info("%s %s rep %d: %.0f events/s, %.1f MB/s", writer, job.filters, repetition,
                figures.events_per_s, figures.mb_per_s)
    return figures


def _overhead(frames: int, workdir: Path, mode: Literal["thread", "process"],
              batch_frames: int) -> OverheadFigures:
    """The descriptor-path micro-benchmark, in a fresh process of its own."""
    return _in_fresh_process(_overhead_here, frames, workdir, mode, batch_frames)


def _overhead_here(frames: int, workdir: Path, mode: Literal["thread", "process"],
                   batch_frames: int) -> OverheadFigures:
    path = workdir / "overhead.rtdc"
    measured = runner.run_overhead(frames, path, mode, batch_frames)
    path.unlink()
    report = measured.producer_reports[0]
    return OverheadFigures(frames=frames, mode=mode, batch_frames=batch_frames,
                           producer_us_per_frame=(report.done - report.began) / frames * 1e6,
                           producer_cpu_us_per_frame=(report.cpu_end_s - report.cpu_start_s)
                           / frames * 1e6,
                           end_to_end_us_per_frame=measured.window.wall_s / frames * 1e6,
                           writer_cpu_us_per_frame=measured.writer_cpu_s / frames * 1e6)


# -- the whole benchmark ---------------------------------------------------------------------
def run_bench(config: BenchConfig | None = None, progress: ProgressFn | None = None
              ) -> BenchResult:
    """Run the comparison (and the extra figures) that ``config`` asks for.

    Parameters
    ----------
    config
        What to run (default: :class:`BenchConfig()`).
    progress
        Called with (runs done, runs) after every run.

    Returns
    -------
    BenchResult
        Every figure; :meth:`BenchResult.table` formats the report.

    Raises
    ------
    RuntimeError
        If a producer process failed.
    """
    config = config or BenchConfig()
    workload = work.load_workload(config.data_dir, config.seed)
    result = BenchResult(config=config, workload=workload.source,
                         event_nbytes=work.BENCH_SCHEMA.event_nbytes, machine=_machine())
    warning = dcnum_warning()
    if warning:
        logger.warning(warning)
        result.warnings.append(warning)
    done = 0

    def measure(writer: str, frames: int, filters: str, repetition: int, name: str,
                memory: bool = False) -> RunFigures:
        nonlocal done
        job = runner.Job(workload=workload, frames=frames, producers=config.producers,
                         filters=filters, path=workdir / f"{name}.rtdc",
                         write_threshold=config.write_threshold, dcnum=warning is None,
                         batch_frames=config.batch_frames or 100, memory=memory)
        figures = _measure(writer, job, repetition, config.keep_files)
        done += 1
        if progress is not None:
            progress(done, config.runs_total)
        return figures

    with _workdir(config.workdir) as workdir:
        # repetitions outermost: a slow spell of a shared machine hits every writer alike
        for repetition in range(config.repeat):
            for filters in config.filters:
                for writer in config.writers:
                    result.runs.append(measure(writer, config.frames, filters, repetition,
                                               f"{writer}-{filters}-{repetition}"))
        for filters in config.filters:
            for writer in config.writers:
                result.memory_runs.append(measure(writer, config.frames, filters, -1,
                                                  f"memory-{writer}-{filters}", memory=True))
        if config.overhead_frames:
            result.overhead = _overhead(config.overhead_frames, workdir, config.modes[0], 0)
            result.overhead_batched = _overhead(config.overhead_frames, workdir,
                                                config.modes[0], _OVERHEAD_BATCH_FRAMES)
            done += 2
            if progress is not None:
                progress(done, config.runs_total)
        if config.memory_scaling:
            for frames in config.scaling_frames:
                for filters in config.filters:
                    for writer in config.scaling_writers:
                        result.scaling.append(measure(
                            writer, frames, filters, -1, f"scaling-{writer}-{filters}-{frames}",
                            memory=True))
    result.warnings.extend(_count_warnings(result))
    return result


@contextlib.contextmanager
def _workdir(workdir: str | None) -> Iterator[Path]:
    if workdir is not None:
        path = Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="shmwriter-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _count_warnings(result: BenchResult) -> list[str]:
    problems = [f"{r.writer} ({r.filters}, {r.frames} frames) wrote {r.file_events} events; "
                f"expected {r.events}" for r in result.all_runs()
                if r.file_events != r.events]
    return [f"event counts disagree: {p}" for p in problems]


def _machine() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for package in ("shmwriter", "numpy", "h5py", "hdf5plugin", "dcnum", "psutil"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    if dcnum_warning() is not None:
        versions["dcnum"] = None  # installed maybe, but not importable: not what ran
    versions["hdf5"] = h5py.version.hdf5_version
    return {"cpu_count": os.cpu_count(), "cpu_model": _cpu_model(),
            "memory_nbytes": psutil.virtual_memory().total, "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def write_json(result: BenchResult, path: str | os.PathLike[str]) -> None:
    """Write every figure of ``result`` as JSON to ``path``."""
    Path(path).write_text(json.dumps(result.to_dict(), indent=1) + "\n")


def write_plot(result: BenchResult, path: str | os.PathLike[str]) -> None:
    """Write a PNG of throughput and memory over time, one line per writer and filter setting.

    For each writer and filter setting, the throughput of the timed run with
    the median events/s and the memory of the run that measured it are drawn.
    Needs matplotlib (the ``bench`` extra).
    """
    from ._report import plot_runs
    plot_runs(result, Path(path))


def median_runs(result: BenchResult) -> Mapping[tuple[str, str], RunFigures]:
    """For each (filters, writer), the repetition with the median events/s."""
    groups: dict[tuple[str, str], list[RunFigures]] = {}
    for run in result.runs:
        groups.setdefault((run.filters, run.writer), []).append(run)
    return {key: sorted(runs, key=lambda r: r.events_per_s)[len(runs) // 2]
            for key, runs in groups.items()}
