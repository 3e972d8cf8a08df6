"""The ``shmwriter`` command: parses arguments, sets up logging, calls the library."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]

logger = logging.getLogger("shmwriter")


class _UserError(Exception):
    """A mistake of the caller: reported as one line, exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``shmwriter`` command line; returns the exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        result: int = args.run(args)
        return result
    except (_UserError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"shmwriter {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"shmwriter {args.command}: interrupted", file=sys.stderr)
        return 130


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmwriter", description="Write per-frame event arrays from many processes into "
        "one .rtdc (HDF5) file through shared memory.",
        epilog="example: shmwriter demo --frames 5000")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    return parser


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
    parser.add_argument("--mode", choices=("thread", "process"), default="thread",
                        help="run the writer in a thread or a process (default: %(default)s)")
    parser.add_argument("--no-compression", action="store_true",
                        help="store uncompressed (default: Zstd level 5)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    kwargs = {"compression": None} if args.no_compression else None
    with _progress_bar(args.frames, "frames", args.quiet) as update:
        summary = run_demo(args.output, frames=args.frames, producers=args.producers,
                           mode=args.mode, hdf5_dataset_kwargs=kwargs, progress=update)
    print(summary.line())
    return 0


class _progress_bar:  # noqa: N801 - used like a function in a with statement
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
