"""The ``shmwriter`` command: parses arguments, sets up logging, calls the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from . import __version__
from .errors import ShmWriterError

__all__ = ["main"]

logger = logging.getLogger("shmwriter")


class _UserError(Exception):
    """A mistake of the caller: reported as one line, exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``shmwriter`` command line; returns the exit code."""
    parser = _build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":  # bench parses its own options (see _add_bench)
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        result: int = args.run(args)
        return result
    except (_UserError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"shmwriter {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ShmWriterError as exc:
        print(f"shmwriter {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"shmwriter {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (``| head``): quiet, like a command killed
        # by SIGPIPE; stdout goes to /dev/null so the flush at exit cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


class _Parser(argparse.ArgumentParser):
    """Reports a bad argument as one line (and where to look), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = _Parser(
        prog="shmwriter", description="Write per-frame event arrays from many processes into "
        "one .rtdc (HDF5) file through shared memory.",
        epilog="example: shmwriter demo --frames 5000")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_bench(sub)
    _add_inspect(sub)
    _add_top(sub)
    _add_clean(sub)
    _add_replay(sub)
    _add_merge(sub)
    return parser


def _add_merge(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "merge", help="join the files of a run written in parts",
        description="Join the .rtdc files of a run written in parts (each a closed run of "
        "its own, frames 0 .. total_frames - 1) into one file, in the order given: frame f "
        "of a part becomes f plus the frames of the parts before it. The result is the file "
        "one Writer would have written from the same frames.",
        epilog=_examples("shmwriter merge run.rtdc part0.rtdc part1.rtdc"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="the merged file to write")
    parser.add_argument("parts", nargs="+", help="the parts, in frame order")
    parser.set_defaults(run=_run_merge)


def _run_merge(args: argparse.Namespace) -> int:
    from .merge import merge_runs
    try:
        placed = merge_runs(args.output, args.parts)
    except ValueError as exc:
        raise _UserError(str(exc)) from None
    events = sum(p.events for p in placed)
    frames = sum(p.frames for p in placed)
    copied = sum(p.copied_chunks for p in placed)
    print(f"{events:,} events of {frames:,} frames from {len(placed)} parts -> {args.output} "
          f"({copied:,} stored chunks copied as they were)")
    return 0


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "demo", help="write a realistic synthetic measurement",
        description="Write a synthetic measurement (images, masks, 22 scalar features, 0-3 "
        "events per frame) from spawned producers into an .rtdc file.",
        epilog=_examples("shmwriter demo", "shmwriter demo --frames 20000 --producers 4 "
                         "--output /tmp/demo.rtdc"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", "-o", default="shmwriter-demo.rtdc",
                        help="file to write (default: %(default)s)")
    parser.add_argument("--frames", type=_positive_int, default=3000,
                        help="frames to write (default: %(default)s)")
    parser.add_argument("--producers", type=_positive_int, default=3,
                        help="producer processes (default: %(default)s)")
    parser.add_argument("--mode", choices=("thread", "process"), default="process",
                        help="run the writer in a process or a thread (default: %(default)s)")
    parser.add_argument("--no-compression", action="store_true",
                        help="store uncompressed (default: Zstd level 5)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .ops.demo import run_demo
    if os.path.isdir(args.output):
        raise _UserError(f"--output {args.output!r} is a directory; expected the path of the "
                         f".rtdc file to write")
    kwargs = {"compression": None} if args.no_compression else None
    with _progress_bar(args.frames, "frames", args.quiet) as update:
        summary = run_demo(args.output, frames=args.frames, producers=args.producers,
                           mode=args.mode, hdf5_dataset_kwargs=kwargs, progress=update)
    print(summary.line())
    return 0


class _progress_bar:  # named like a function: used as one in a with statement
    """A tqdm bar that stays silent when stderr is not a terminal or --quiet is given."""

    def __init__(self, total: int, unit: str, quiet: bool) -> None:
        from tqdm import tqdm
        self._bar = tqdm(total=total, unit=unit, disable=quiet or not sys.stderr.isatty(),
                         file=sys.stderr, dynamic_ncols=True)

    def __enter__(self) -> _progress_bar:
        return self

    def __call__(self, done: int, total: int) -> None:
        self._bar.update(max(0, done - self._bar.n))

    def __exit__(self, *exc: object) -> None:
        self._bar.close()


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # only a name here: its options come from the benchmark's config, which the other
    # commands must not import; _run_bench parses them (``--help`` included)
    parser = sub.add_parser("bench", help="compare shmwriter with dcnum's writer and plain h5py",
                            add_help=False)
    parser.set_defaults(run=_run_bench)


def _bench_parser() -> argparse.ArgumentParser:
    from .bench.config import BenchConfig
    defaults = BenchConfig()
    parser = _Parser(
        prog="shmwriter bench",
        description="Write the same events (~40 KB each, 0-3 per frame, real images when the "
        "dcnum test data are there) with shmwriter (spawned producers, writer thread and "
        "writer process), with dcnum's QueueWriterThread fed through an mp.Queue, and with "
        "plain h5py from memory (the limit), for uncompressed+fletcher32 and Zstd-5+fletcher32. "
        "Prints the medians of events/s, MB/s, wall and CPU time and writer CPU per GB, the "
        "peak memory of one more run of each writer (the timed runs sample none), the ratios, "
        "and the per-frame cost of the descriptor path.",
        epilog=_examples("shmwriter bench", "shmwriter bench --frames 500 --repeat 1 --quiet",
                         "shmwriter bench --json bench.json --plot bench.png",
                         "shmwriter bench --memory-scaling --filters zstd5"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=_positive_int, default=defaults.frames,
                        help="frames per run (default: %(default)s)")
    parser.add_argument("--producers", type=_positive_int, default=defaults.producers,
                        help="producer processes (default: %(default)s)")
    parser.add_argument("--repeat", type=_positive_int, default=defaults.repeat,
                        help="repetitions; figures are medians (default: %(default)s)")
    parser.add_argument("--modes", type=_choices("thread", "process"),
                        default=defaults.modes, metavar="MODE[,MODE]",
                        help="shmwriter writer modes; the first also runs the descriptor-path and "
                        "memory-scaling measurements (default: process,thread)")
    parser.add_argument("--filters", type=_choices("uncompressed", "zstd5"),
                        default=defaults.filters, metavar="NAME[,NAME]",
                        help="filter settings (default: uncompressed,zstd5)")
    parser.add_argument("--overhead-frames", type=_count, default=defaults.overhead_frames,
                        metavar="N", help="empty frames of the descriptor-path micro-benchmark;"
                        " 0 skips it (default: %(default)s)")
    parser.add_argument("--batch-frames", type=_count, default=defaults.batch_frames,
                        metavar="N", help="frames per put_many call of the batched shmwriter "
                        "row; 0 leaves it out (default: %(default)s)")
    parser.add_argument("--memory-scaling", action="store_true",
                        help="also run shmwriter and dcnum (Zstd-5) once for each of "
                        "--scaling-frames and compare their peak memory")
    parser.add_argument("--scaling-frames", type=_int_list, default=defaults.scaling_frames,
                        metavar="N,N", help="frames of the memory-scaling runs "
                        "(default: 6000,60000)")
    parser.add_argument("--data", default=defaults.data_dir, metavar="DIR",
                        help="folder of the dcnum test data zip files; synthetic events "
                        "if absent (default: $SHMWRITER_TESTDATA, here %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the workload (default: %(default)s)")
    parser.add_argument("--workdir", metavar="DIR",
                        help="folder for the files written (default: a temporary folder)")
    parser.add_argument("--keep-files", action="store_true",
                        help="keep the files written (their paths go into --json)")
    parser.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    parser.add_argument("--plot", metavar="PATH",
                        help="write a PNG of throughput and memory over time (matplotlib)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return parser


def _run_bench(options: argparse.Namespace) -> int:
    import importlib.util

    from .bench.config import BenchConfig
    from .bench.suite import dcnum_warning, run_bench, write_json, write_plot
    args = _bench_parser().parse_args(options.rest)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise _UserError("--plot needs matplotlib: pip install 'shmwriter[bench]'")
    config = BenchConfig(
        frames=args.frames, producers=args.producers, repeat=args.repeat, modes=args.modes,
        filters=args.filters, seed=args.seed, data_dir=args.data, workdir=args.workdir,
        keep_files=args.keep_files, overhead_frames=args.overhead_frames,
        memory_scaling=args.memory_scaling, scaling_frames=args.scaling_frames,
        batch_frames=args.batch_frames)
    warning = dcnum_warning()
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr)
    with _progress_bar(config.runs_total, "runs", args.quiet) as update:
        result = run_bench(config, progress=update)
    print(result.table())
    if args.json:
        write_json(result, args.json)
    if args.plot:
        write_plot(result, args.plot)
    return 0 if result.consistent else 1


def _choices(*allowed: str) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(allowed)}; got {text!r}")
        return values
    return parse


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(_positive_int(part) for part in text.split(","))


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0; got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0; got {text!r}")
    return value


def _add_inspect(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "inspect", help="show what an .rtdc file holds",
        description="Show an .rtdc file at a glance: events, frames, every /events dataset "
        "with dtype, shape, chunks and filters, file size and compression ratio, metadata, "
        "the frames the writer recorded as missing, and whether the run closed cleanly. "
        "Works on a file that is still being written (it is read in SWMR mode). "
        "Exit code 0 for a complete file, 1 for an incomplete one, 2 for an error.",
        epilog=_examples("shmwriter inspect measurement.rtdc",
                         "shmwriter inspect measurement.rtdc --json | jq .missing_frames"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="the .rtdc (HDF5) file")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(run=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    import json

    from .ops.inspect import format_report, inspect_file
    try:
        report = inspect_file(args.file)
    except ValueError as exc:  # not HDF5, not openable, not an .rtdc layout
        raise _UserError(str(exc)) from None
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(report))
    return 0 if report.complete else 1


def _add_top(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "top", aliases=["status"], help="watch the running writers of this user",
        description="Show the runs of this user, refreshed live: ring occupancy, frames "
        "written, events/s, MB/s, chunks queued for the disk, how many frames the file lags "
        "behind the newest frame received, producers alive, state and file. It only reads "
        "the header of each run's shared-memory segment: the writers are never blocked or "
        "slowed down. Rates are measured over one interval. Ctrl-C quits.",
        epilog=_examples("shmwriter top", "shmwriter top --interval 0.5",
                         "shmwriter status --once --json"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=_positive_float, default=1.0, metavar="S",
                        help="seconds between refreshes, and the window of the rates "
                        "(default: %(default)s)")
    parser.add_argument("--once", action="store_true",
                        help="print one table (after one interval, for the rates) and exit")
    parser.add_argument("--json", action="store_true",
                        help="with --once: print one JSON document instead of the table")
    parser.set_defaults(run=_run_top)


def _run_top(args: argparse.Namespace) -> int:
    import json
    import time

    from .ops.runs import format_statuses, run_statuses, snapshot_runs
    if args.json and not args.once:
        raise _UserError("--json prints one document and needs --once")
    before = snapshot_runs()
    if args.once:
        time.sleep(args.interval)
        statuses = run_statuses(before, snapshot_runs())
        if args.json:
            print(json.dumps({"interval_s": args.interval,
                              "runs": [s.to_dict() for s in statuses]}, indent=2))
        else:
            print(format_statuses(statuses))
        return 0
    on_terminal = sys.stdout.isatty()
    statuses = run_statuses([], before)  # shown at once; the rates follow
    try:
        while True:
            title = (f"shmwriter top: {len(statuses)} run(s) at {time.strftime('%H:%M:%S')}, "
                     f"every {args.interval:g} s; Ctrl-C quits")
            text = f"{title}\n\n{format_statuses(statuses)}\n"
            # a plain ANSI home + clear keeps the table in place on a terminal
            sys.stdout.write(("\x1b[H\x1b[2J" + text) if on_terminal else text + "\n")
            sys.stdout.flush()
            time.sleep(args.interval)
            after = snapshot_runs()
            statuses, before = run_statuses(before, after), after
    except KeyboardInterrupt:
        return 0


def _add_clean(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "clean", help="remove shared memory left by dead runs",
        description="Remove the shared-memory segments (/dev/shm/shmw_<pid>_<hex>) of runs "
        "whose owner process is dead; a segment whose owner lives is never removed. The "
        "owner pid is taken from the name and from the segment's header; a pid that now "
        "belongs to a process started after the segment counts as dead (reused). Owners "
        "are judged in this pid namespace: run it where the writers run.",
        epilog=_examples("shmwriter clean --dry-run", "shmwriter clean",
                         "shmwriter clean shmw_4242_0123456789abcdef"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="only these segments (default: every segment of this user)")
    parser.add_argument("--dry-run", "-n", action="store_true",
                        help="show what would be removed; remove nothing")
    parser.set_defaults(run=_run_clean)


def _run_clean(args: argparse.Namespace) -> int:
    from .ops.runs import clean_leftovers, format_clean
    verdicts = clean_leftovers(args.names or None, dry_run=args.dry_run)
    print(format_clean(verdicts, dry_run=args.dry_run))
    return 0


def _add_replay(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "replay", help="write a recorded measurement again through shmwriter",
        description="Read a measurement, group its events into frames by the 'frame' feature,\n"
        "hand the frames in shuffled order to spawned producers and write them through\n"
        "shmwriter. The output holds every feature of the input event for event, and its\n"
        "metadata, logs and tables.",
        epilog=_examples("shmwriter replay in.rtdc out.rtdc",
                         "shmwriter replay in.rtdc out.rtdc --producers 4 --quiet"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", metavar="IN.rtdc", help="the measurement to read")
    parser.add_argument("output", metavar="OUT.rtdc", help="the file to write (replaced)")
    parser.add_argument("--producers", type=_positive_int, default=2,
                        help="producer processes (default: %(default)s)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run_replay)


def _run_replay(args: argparse.Namespace) -> int:
    from .ops.replay import ReplayInputError, ReplayPlan, replay
    try:
        plan = ReplayPlan.from_file(args.input)
        with _progress_bar(plan.frames, "frames", args.quiet) as update:
            summary = replay(plan, args.output, producers=args.producers, progress=update)
    except ReplayInputError as exc:
        raise _UserError(str(exc)) from None
    print(summary.line())
    return 0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number; got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number; got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
