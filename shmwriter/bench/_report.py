"""The benchmark's report: a Markdown table of the medians, the extra figures, and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .figures import BenchResult, RunFigures, WriterSummary

__all__ = ["format_report", "plot_runs"]

_WRITER_LABELS = {"shmwriter-thread": "shmwriter (thread)",
                  "shmwriter-process": "shmwriter (process)",
                  "dcnum": "dcnum QueueWriterThread",
                  "shmwriter-blocks": "blocks: shmwriter put (process)",
                  "shmwriter-batched": "blocks: shmwriter put_many (process)",
                  "shmwriter-frames": "blocks: shmwriter frames() in place (process)",
                  "dcnum-blocks": "blocks: dcnum QueueWriterThread",
                  "h5py": "plain h5py (limit)"}
_RATE_WINDOW_S = 0.5


def _label(writer: str, fallback: bool) -> str:
    if writer.startswith("dcnum") and fallback:
        return _WRITER_LABELS[writer].replace("dcnum QueueWriterThread",
                                              "pickling writer (dcnum ABSENT)")
    return _WRITER_LABELS.get(writer, writer)


def format_report(result: BenchResult) -> str:
    """The text ``shmwriter bench`` prints: header, table, descriptor path, memory scaling."""
    from .config import FILTERS, MEMORY_SAMPLE_INTERVAL_S
    config = result.config
    fallback = any(w.startswith("dcnum is not installed") for w in result.warnings)
    runs = result.runs or result.scaling
    events = runs[0].events if result.runs else 0
    machine = result.machine
    versions = machine["versions"]
    lines = [f"WARNING: {w}" for w in result.warnings]
    lines += [
        (f"shmwriter bench: {config.frames} frames ({events:,} events, "
         f"{events * result.event_nbytes / 1e6:.1f} MB), {config.producers} producers, "
         f"median of {config.repeat} repetition(s)"),
        f"workload: {result.workload}",
        (f"machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), "
         f"{machine['memory_nbytes'] / 2**30:.0f} GiB, Python {machine['python']}, "
         f"h5py {versions['h5py']} (HDF5 {versions['hdf5']}), dcnum {versions['dcnum']}"),
        "",
        ("| filters | writer | events/s | MB/s | wall s | CPU s | writer CPU s/GB "
         "| peak MB (over idle) | x dcnum | x h5py | writer CPU/GB x dcnum |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = result.ratios()
    for summary in result.summaries():
        lines.append(_row(summary, FILTERS[summary.filters],
                          ratios.get(summary.filters, {}).get(summary.writer, {}), fallback))
    lines += ["", "events/s, MB/s and CPU are medians; MB/s is uncompressed event "
              "bytes per wall second; the ratios compare medians of events/s (writer CPU per "
              "GB for the last column); \"blocks:\" rows compare with dcnum's blocks row. "
              "CPU s: all processes, from the start signal to the "
              "closed file. Writer CPU: " + _scopes(result) + ". Peak MB: summed PSS of the "
              "process tree (shared memory counted once), from one more run of each row "
              f"that samples it every {MEMORY_SAMPLE_INTERVAL_S} s (the timed runs do not: "
              "a sample costs about 10 ms of CPU); over idle: above the same tree, set up "
              "and idle, just before the start."]
    lines += _stage_lines(result, fallback)
    for o in (result.overhead, result.overhead_batched):
        if o is None:
            continue
        how = f"put_many of {o.batch_frames}" if o.batch_frames else "put one by one"
        lines += ["", (f"descriptor path ({o.frames:,} empty frames, {how}, one producer, "
                       f"writer {o.mode}): "
                       f"{o.producer_us_per_frame:.2f} us/frame in the producer "
                       f"({o.producer_cpu_us_per_frame:.2f} us CPU), "
                       f"{o.end_to_end_us_per_frame:.2f} us/frame end to end, writer "
                       f"{o.writer_cpu_us_per_frame:.2f} us CPU/frame")]
    if result.scaling:
        lines += ["", *_scaling_lines(result, fallback)]
    return "\n".join(lines)


def _row(s: WriterSummary, filters_label: str, ratio: dict[str, float], fallback: bool) -> str:
    def times(key: str) -> str:
        return f"{ratio[key]:.2f}x" if key in ratio else ""
    return (f"| {filters_label} | {_label(s.writer, fallback)} | {s.events_per_s:,.0f} "
            f"| {s.mb_per_s:,.1f} | {s.wall_s:.2f} | {s.cpu_s:.2f} | {s.writer_cpu_s_per_gb:.2f} "
            f"| {_peak_cell(s.peak_memory_nbytes, s.peak_over_baseline_nbytes)} "
            f"| {times('events_per_s_vs_dcnum')} | {times('events_per_s_vs_h5py')} "
            f"| {times('writer_cpu_per_gb_vs_dcnum')} |")


def _peak_cell(peak: int | None, over: int | None) -> str:
    if peak is None or over is None:
        return ""
    return f"{peak / 1e6:,.0f} (+{over / 1e6:,.0f})"


_STAGES = (("producers", "producers"), ("descriptors", "writer loop"),
           ("gather", "gather copy"), ("encode", "checksums + compression"),
           ("hdf5", "HDF5 write + close"))


def _stage_lines(result: BenchResult, fallback: bool) -> list[str]:
    """Where shmwriter's CPU goes, per stage, in CPU seconds per GB (medians)."""
    from .config import FILTERS
    summaries = [s for s in result.summaries() if s.stage_cpu_s_per_gb]
    if not summaries:
        return []
    lines = ["", ("where the CPU goes (CPU s per GB of event data, medians; the writer's "
                  "stages add up to its threads' CPU):"), "",
             "| filters | writer | " + " | ".join(label for _, label in _STAGES) + " |",
             "|---|---|" + "---:|" * len(_STAGES)]
    for s in summaries:
        cells = " | ".join(f"{s.stage_cpu_s_per_gb.get(key, 0.0):.2f}" for key, _ in _STAGES)
        lines.append(f"| {FILTERS[s.filters]} | {_label(s.writer, fallback)} | {cells} |")
    return lines


def _scopes(result: BenchResult) -> str:
    scopes: dict[str, list[str]] = {}
    for summary in result.summaries():
        names = scopes.setdefault(summary.writer_cpu_scope, [])
        if summary.writer not in names:
            names.append(summary.writer)
    meaning = {"writer threads": "the writer's threads (this process's CPU minus its main "
                                 "and sampling threads)",
               "writer process": "the writer process",
               "whole process": "the whole process (sampling thread excluded)"}
    return "; ".join(f"{', '.join(names)}: {meaning.get(scope, scope)}"
                     for scope, names in scopes.items())


def _scaling_lines(result: BenchResult, fallback: bool) -> list[str]:
    from .config import FILTERS, MEMORY_SAMPLE_INTERVAL_S
    lines = [("memory scaling (one run each; producers put pre-built frames as fast as they "
              "can, far faster than the writer; memory sampled every "
              f"{MEMORY_SAMPLE_INTERVAL_S} s):"), "",
             ("| filters | writer | frames | events | wall s | producers done at s | peak MB "
              "| over idle MB |"), "|---|---|---:|---:|---:|---:|---:|---:|"]
    for run in result.scaling:
        done = "" if run.producers_s is None else f"{run.producers_s:.2f}"
        peak, over = run.sampled_peak()
        lines.append(f"| {FILTERS[run.filters]} | {_label(run.writer, fallback)} "
                     f"| {run.frames:,} | {run.events:,} "
                     f"| {run.wall_s:.2f} | {done} | {peak / 1e6:,.0f} | {over / 1e6:,.0f} |")
    frames = sorted({run.frames for run in result.scaling})
    lines.append("")
    for filters, by_writer in result.scaling_ratios().items():
        for writer, ratio in by_writer.items():
            lines.append(f"- {FILTERS[filters]}, {_label(writer, fallback)}: peak at "
                         f"{frames[-1]:,} frames / at {frames[0]:,} frames = "
                         f"{ratio['peak']:.2f} (over idle: {ratio['peak_over_baseline']:.2f})")
    return lines


def _rates(run: RunFigures, event_nbytes: int) -> tuple[np.ndarray[Any, Any],
                                                        np.ndarray[Any, Any]]:
    """MB/s over time from the progress samples, each over the last ~0.5 s."""
    series = np.array(run.progress, dtype=float).reshape(-1, 2)
    times, events = series[:, 0], series[:, 1]
    rates = np.zeros_like(times)
    for i in range(1, len(times)):
        j = max(0, int(np.searchsorted(times, times[i] - _RATE_WINDOW_S)) - 1)
        j = min(j, i - 1)
        rates[i] = (events[i] - events[j]) * event_nbytes / 1e6 / (times[i] - times[j])
    return times, rates


def plot_runs(result: BenchResult, path: Path) -> None:
    """Throughput (top, the median timed run) and memory (bottom, the memory run) over time,
    one column per filter setting."""
    from matplotlib.figure import Figure

    from .config import FILTERS
    from .suite import median_runs
    chosen = median_runs(result)
    filters = list(dict.fromkeys(key[0] for key in chosen))
    fallback = any(w.startswith("dcnum is not installed") for w in result.warnings)
    figure = Figure(figsize=(6 * len(filters), 7), layout="constrained")
    axes = figure.subplots(2, len(filters), squeeze=False, sharex="col")
    for column, name in enumerate(filters):
        top, bottom = axes[0][column], axes[1][column]
        for (run_filters, writer), run in chosen.items():
            if run_filters != name or not run.progress:
                continue
            times, rates = _rates(run, result.event_nbytes)
            label = _label(writer, fallback)
            (line,) = top.plot(times, rates, label=label)
            memory_run = result.memory_run(run_filters, writer)
            if memory_run is not None and memory_run.memory:
                samples = np.array(memory_run.memory, dtype=float)
                bottom.plot(samples[:, 0], samples[:, 1] / 1e6, label=label,
                            color=line.get_color())
        top.set_title(f"{FILTERS[name]} ({result.config.frames} frames)")
        top.set_ylabel("MB/s handed to the file (0.5 s window)")
        bottom.set_ylabel("summed PSS of the process tree (MB)")
        bottom.set_xlabel("seconds since the start signal")
        top.legend(fontsize="small")
    figure.suptitle("shmwriter bench: the median timed run of each writer (top) and the run "
                    "that measured its memory (bottom)")
    figure.savefig(path, dpi=100)
