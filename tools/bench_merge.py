"""merge_runs: MB/s where stored chunks are copied as they are, and where rows are encoded again.

A merge copies a part's stored chunks unchanged where its rows lie on the
merged file's chunk boundaries as on its own, and encodes the other rows
again. Three merges of the same run show both, beside HDF5's own two limits,
all in one run of this script:

- one part (a run of one node): every chunk lines up, every one is copied;
- a sequence of two parts (a run split by hand in the middle): the first
  part's chunks are copied, the second part's rows are encoded again (unless
  the first part happens to end on a chunk boundary);
- a block plan of two parts (blocks of ``--frames-per-block``, as RayWriter
  on two nodes writes them): blocks start anywhere in a chunk, so little lines up;
- h5py's copy of ``/events`` into a new file (HDF5's object copy: stored
  chunks, no filters run), the limit of copying;
- h5py reading ``/events`` and writing it into a new file with the same
  filters (HDF5 runs them), what encoding again costs without shmwriter.

MB/s are of the events' bytes as written (uncompressed), per merge, medians of
``--repeat``; before each, the page cache's dirty pages are written out (sync), and
the time ends when the output is closed, not synced. The parts are written first
by in-process Writers with the bench's real events (dcnum's test data next to
this checkout, else synthetic).

    python tools/bench_merge.py [--frames 6000] [--frames-per-block 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h5py

import shmwriter
from shmwriter._blocks import PART_LOG, BlockPlan
from shmwriter._write.h5sink import dataset_kwargs
from shmwriter.bench._work import BENCH_SCHEMA, _batch_events, load_workload
from shmwriter.merge import merge_runs

CHECKOUT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dcnum-testdata"
FILTERS = {"uncompressed + fletcher32": {"compression": None},
           "Zstd-5 + fletcher32": None}
BATCH_FRAMES = 100


def write_part(path, workload, run_frames, kwargs, logs=None):
    """A Writer's file of ``run_frames`` (run indices), put in order as its frames 0..;
    return its event bytes."""
    nbytes = 0
    with shmwriter.Writer(path, BENCH_SCHEMA, total_frames=len(run_frames), mode="thread",
                          hdf5_dataset_kwargs=kwargs, index_feature="frame",
                          logs=logs) as writer, writer.producer() as producer:
        for at in range(0, len(run_frames), BATCH_FRAMES):
            local = list(range(at, min(at + BATCH_FRAMES, len(run_frames))))
            counts, arrays = _batch_events(workload, [run_frames[f] for f in local])
            producer.put_many(local, counts, arrays)
            nbytes += sum(a.nbytes for a in arrays.values()) if arrays else 0
    return nbytes


def write_inputs(folder, workload, frames, frames_per_block, kwargs):
    """The run as one part, as a sequence of two and as a plan of two; its event bytes."""
    nbytes = write_part(folder / "whole.rtdc", workload, list(range(frames)), kwargs)
    half = frames // 2
    write_part(folder / "seq0.rtdc", workload, list(range(half)), kwargs)
    write_part(folder / "seq1.rtdc", workload, list(range(half, frames)), kwargs)
    plan = BlockPlan(total_frames=frames, frames_per_block=frames_per_block, parts=2)
    for part in range(2):
        write_part(folder / f"plan{part}.rtdc", workload,
                   [f for block in plan.blocks(part) for f in block], kwargs,
                   logs={PART_LOG: plan.log_lines(part)})
    return nbytes


def h5py_copy(source, output):
    with h5py.File(source, "r") as src, h5py.File(output, "w") as dst:
        src.copy(src["events"], dst, "events")


def h5py_rewrite(source, output, kwargs):
    """Each /events dataset read whole and written with the Writer's filters, by HDF5."""
    filters = dataset_kwargs(kwargs)
    with h5py.File(source, "r") as src, h5py.File(output, "w") as dst:
        for name, dataset in src["events"].items():
            dst.create_dataset(f"events/{name}", data=dataset[:], chunks=dataset.chunks,
                               **filters)


def timed(run: Callable[[], object], output: Path) -> tuple[float, object]:
    """Seconds of ``run()`` and its result. The last run's ``output`` is removed and dirty
    pages go to disk first, so that neither falls into the time."""
    output.unlink(missing_ok=True)
    os.sync()
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, result


def merges(folder, kwargs):
    """What to time: name -> run."""
    out = folder / "out.rtdc"
    return {
        "merge: one part": lambda: merge_runs(out, [folder / "whole.rtdc"]),
        "merge: sequence of 2": lambda: merge_runs(out, [folder / "seq0.rtdc",
                                                         folder / "seq1.rtdc"]),
        "merge: plan of 2": lambda: merge_runs(out, [folder / "plan0.rtdc",
                                                     folder / "plan1.rtdc"]),
        "h5py copy of /events": lambda: h5py_copy(folder / "whole.rtdc", out),
        "h5py read + write of /events": lambda: h5py_rewrite(folder / "whole.rtdc", out, kwargs),
    }


def total_chunks(path):
    with h5py.File(path, "r") as h5:
        return sum(-(-len(d) // d.chunks[0]) for d in h5["events"].values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=6000)
    parser.add_argument("--frames-per-block", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--data", default=str(CHECKOUT_DATA) if CHECKOUT_DATA.is_dir() else None)
    args = parser.parse_args(argv)
    workload = load_workload(args.data)
    print(f"merge bench: {args.frames} frames, plan blocks of {args.frames_per_block}, "
          f"{os.cpu_count()} CPUs, medians of {args.repeat}; events from "
          f"{args.data or 'synthetic'}")
    print("| filters | what | s | MB/s | chunks copied | vs h5py copy | vs h5py read + write |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, kwargs in FILTERS.items():
        with tempfile.TemporaryDirectory(dir=os.getcwd(), prefix=".bench-merge-") as name:
            folder = Path(name)
            mb = write_inputs(folder, workload, args.frames, args.frames_per_block,
                              kwargs) / 1e6
            chunks = total_chunks(folder / "whole.rtdc")
            rows = {}
            for what, run in merges(folder, kwargs).items():
                results = [timed(run, folder / "out.rtdc") for _ in range(args.repeat)]
                placed = results[0][1]
                copied = sum(p.copied_chunks for p in placed) if isinstance(placed, list) \
                    else None
                rows[what] = (statistics.median(s for s, _ in results), copied)
            copy_s = rows["h5py copy of /events"][0]
            rewrite_s = rows["h5py read + write of /events"][0]
            for what, (seconds, copied) in rows.items():
                share = "" if copied is None else f"{copied:,} of {chunks:,}"
                print(f"| {label} | {what} | {seconds:.2f} | {mb / seconds:,.0f} | {share} "
                      f"| {copy_s / seconds:.2f}x | {rewrite_s / seconds:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
