"""A realistic synthetic measurement, written by spawned producers: the ``demo`` command.

Each frame has 0 to 3 events; each event has an 80x250 uint8 image (smooth
background, noise and a darker elliptic cell), its boolean mask and 22 scalar
features named as dclab knows them. Everything is derived from the frame index
and a seed, so a test can recompute any frame and compare it with the file.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._spec import Feature, Schema
from ..errors import BrokenError
from ..producer import Producer
from ..writer import Writer
from .memory import TreeMemory

__all__ = ["DEMO_METADATA", "DEMO_SCHEMA", "DemoSummary", "demo_events", "run_demo"]

_HEIGHT, _WIDTH = 80, 250
_SCALARS = ("area_cvx", "area_msd", "area_ratio", "area_um", "aspect", "bright_avg",
            "bright_sd", "circ", "deform", "eccentr_prnc", "inert_ratio_cvx",
            "inert_ratio_prnc", "inert_ratio_raw", "per_ratio", "per_um_raw", "pos_x",
            "pos_y", "size_x", "size_y", "tilt", "time", "volume")
_PIXEL_SIZE_UM = 0.34
_FRAME_RATE_HZ = 2000.0

#: Features of the demo's events.
DEMO_SCHEMA = Schema({
    "image": Feature("uint8", (_HEIGHT, _WIDTH)),
    "mask": Feature("bool", (_HEIGHT, _WIDTH)),
    **{name: Feature("float64") for name in _SCALARS},
})

#: Complete .rtdc metadata, so that dclab's check_dataset finds nothing to report.
DEMO_METADATA: dict[str, Any] = {
    "experiment:date": "2026-01-01", "experiment:time": "12:00:00",
    "experiment:run index": 1, "experiment:sample": "synthetic blood",
    "imaging:pixel size": _PIXEL_SIZE_UM, "imaging:frame rate": _FRAME_RATE_HZ,
    "imaging:roi size x": _WIDTH, "imaging:roi size y": _HEIGHT,
    "imaging:roi position x": 0, "imaging:roi position y": 0,
    "imaging:flash device": "LED", "imaging:flash duration": 2.0,
    "setup:channel width": 20.0, "setup:chip region": "channel", "setup:flow rate": 0.06,
    "setup:flow rate sample": 0.02, "setup:flow rate sheath": 0.04,
    "setup:medium": "CellCarrier", "setup:module composition": "AcCellerator",
    "setup:software version": "shmwriter demo", "setup:identifier": "shmwriter-demo",
    "setup:temperature": 23.0, "fluorescence:laser count": 0,
    "online_contour:bin area min": 10, "online_contour:bin kernel": 5,
    "online_contour:bin threshold": -6, "online_contour:image blur": 0,
    "online_contour:no absdiff": True,
}

_ROWS, _COLS = np.mgrid[0:_HEIGHT, 0:_WIDTH].astype(np.float32)
_BACKGROUND = (100 + 12 * np.sin(_COLS / 37.0) + 8 * np.cos(_ROWS / 23.0)).astype(np.float32)


def demo_events(frame_index: int, seed: int = 42) -> dict[str, np.ndarray[Any, Any]] | None:
    """The events of one demo frame (None when it has none), reproducibly."""
    rng = np.random.default_rng([seed, frame_index])
    nevents = int(rng.integers(0, 4))
    if nevents == 0:
        return None
    images = np.empty((nevents, _HEIGHT, _WIDTH), np.uint8)
    masks = np.empty((nevents, _HEIGHT, _WIDTH), bool)
    scalars = {name: np.empty(nevents) for name in _SCALARS}
    for k in range(nevents):
        cx, cy = rng.uniform(30, _WIDTH - 30), rng.uniform(25, _HEIGHT - 25)
        ax, ay = rng.uniform(8, 20), rng.uniform(6, 14)
        mask = ((_COLS - cx) / ax) ** 2 + ((_ROWS - cy) / ay) ** 2 <= 1.0
        image = _BACKGROUND + rng.normal(0, 3, (_HEIGHT, _WIDTH)).astype(np.float32)
        image[mask] -= rng.uniform(15, 40)
        images[k] = np.clip(image, 0, 255).astype(np.uint8)
        masks[k] = mask
        area_px = float(mask.sum())
        values = _shape_features(ax, ay, cx, cy, area_px, images[k][mask])
        values["time"] = frame_index / _FRAME_RATE_HZ
        for name in _SCALARS:
            scalars[name][k] = values[name]
    return {"image": images, "mask": masks, **scalars}


def _shape_features(ax: float, ay: float, cx: float, cy: float, area_px: float,
                    inside: np.ndarray[Any, Any]) -> dict[str, float]:
    perimeter = np.pi * (3 * (ax + ay) - np.sqrt((3 * ax + ay) * (ax + 3 * ay)))
    circ = 2 * np.sqrt(np.pi * area_px) / perimeter
    area_um = area_px * _PIXEL_SIZE_UM**2
    ratio = max(ax, ay) / min(ax, ay)
    return {
        "area_cvx": area_px, "area_msd": area_px, "area_ratio": 1.0, "area_um": area_um,
        "aspect": ax / ay, "bright_avg": float(inside.mean()), "bright_sd": float(inside.std()),
        "circ": circ, "deform": 1 - circ, "eccentr_prnc": float(np.sqrt(1 - 1 / ratio**2)),
        "inert_ratio_cvx": ratio, "inert_ratio_prnc": ratio, "inert_ratio_raw": ratio,
        "per_ratio": 1.0, "per_um_raw": perimeter * _PIXEL_SIZE_UM,
        "pos_x": cx * _PIXEL_SIZE_UM, "pos_y": cy * _PIXEL_SIZE_UM,
        "size_x": 2 * ax * _PIXEL_SIZE_UM, "size_y": 2 * ay * _PIXEL_SIZE_UM, "tilt": 0.0,
        "volume": 4 / 3 * np.pi * ax * ay * ay * _PIXEL_SIZE_UM**3,
    }


def produce_frames(producer: Producer, frames: list[int], seed: int) -> None:
    """Worker: put ``frames`` (in the given order) and close the producer.

    Ctrl-C reaches the whole process group: a producer then stops quietly
    (exit code 130), as it does when the run was aborted (exit code 3), and
    leaves the report to the process that owns the run.
    """
    try:
        # started with SIGINT blocked (see run_demo): a Ctrl-C that came meanwhile
        # strikes here, inside the try
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        with producer:
            for index in frames:
                producer.put(index, demo_events(index, seed))
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenError:  # the run was aborted or failed: its owner says why
        sys.exit(3)


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoSummary:
    """What a demo run did."""

    path: str
    """The file written."""
    frames: int
    """Frames of the run."""
    events: int
    """Events written."""
    data_nbytes: int
    """Bytes of event data (uncompressed)."""
    file_nbytes: int
    """Size of the file."""
    seconds: float
    """Wall time from the first producer's start to the closed file."""
    peak_memory_nbytes: int
    """Peak of the summed PSS of this process and its children."""

    def line(self) -> str:
        """The one-line summary the ``demo`` command prints."""
        mb = self.data_nbytes / 1e6
        return (f"{self.events} events, {mb:.1f} MB of event data "
                f"({self.file_nbytes / 1e6:.1f} MB on disk) in {self.seconds:.2f} s: "
                f"{mb / self.seconds:.1f} MB/s, peak memory {self.peak_memory_nbytes / 1e6:.0f} MB"
                f" -> {self.path}")


def run_demo(path: str | os.PathLike[str], *, frames: int = 3000, producers: int = 3,
             seed: int = 42, mode: str = "process",
             hdf5_dataset_kwargs: dict[str, Any] | None = None,
             progress: Callable[[int, int], None] | None = None) -> DemoSummary:
    """Write the demo measurement with ``producers`` spawned processes.

    Frames are dealt to the producers in turn and each producer shuffles its
    share slightly, so the writer has real reordering to do. ``progress`` is
    called with (frames written, frames) while the run goes on.

    Raises
    ------
    KeyboardInterrupt
        On Ctrl-C, after the run was aborted: the file is closed and holds every
        frame put so far; its run log says the run was interrupted.
    """
    path = os.fspath(path)
    memory = TreeMemory()
    shares = _deal(frames, producers, seed)
    ctx = multiprocessing.get_context("spawn")
    start = time.perf_counter()
    with Writer(path, DEMO_SCHEMA, total_frames=frames, metadata=DEMO_METADATA,
                mode=mode, hdf5_dataset_kwargs=hdf5_dataset_kwargs) as writer:  # type: ignore[arg-type]
        workers = [ctx.Process(target=produce_frames, args=(writer.producer(), share, seed))
                   for share in shares]
        # a Ctrl-C while a producer starts would strike before it can stop quietly
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for worker in workers:
                worker.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for worker in workers:
            while worker.is_alive():
                worker.join(0.2)
                memory.sample()
                if progress is not None:
                    progress(writer.written_frames, frames)
        for worker in workers:
            if worker.exitcode != 0:
                raise RuntimeError(f"demo producer {worker.name} failed "
                                   f"(exit code {worker.exitcode})")
    seconds = time.perf_counter() - start
    if progress is not None:
        progress(frames, frames)
    data_nbytes = writer.written_events * DEMO_SCHEMA.event_nbytes
    return DemoSummary(path=path, frames=frames, events=writer.written_events,
                       data_nbytes=data_nbytes, file_nbytes=os.path.getsize(path),
                       seconds=seconds, peak_memory_nbytes=memory.peak_nbytes)


def _deal(frames: int, producers: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    shares = []
    for k in range(producers):
        share = np.arange(k, frames, producers)
        # shuffle within windows of 8 frames: out of order, but not wildly
        for lo in range(0, len(share), 8):
            rng.shuffle(share[lo:lo + 8])
        shares.append(share.tolist())
    return shares
