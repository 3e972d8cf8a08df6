"""``shmwriter inspect`` through its real entry point, on files written by real runs."""

from __future__ import annotations

import multiprocessing
import os
import signal
from multiprocessing import resource_tracker

import h5py
import numpy as np
import posix_ipc
import pytest
from _cli_workers import SCHEMA, events_of, nevents_of, own_writer_until_killed, put_frames
from _cli_workers import shmwriter_cli as cli
from _cli_workers import shmwriter_json as cli_json

import shmwriter

CTX = multiprocessing.get_context("spawn")


def write_run(path, frames: list[int], total_frames: int, producers: int = 2,
              **writer_kwargs) -> shmwriter.Writer:
    """A real run: ``frames`` dealt to spawned producers; the rest never arrive."""
    go = CTX.Event()
    go.set()
    with shmwriter.Writer(path, SCHEMA, total_frames=total_frames, write_threshold=8,
                          flush_interval_s=0.1, **writer_kwargs) as writer:
        workers = [CTX.Process(target=put_frames,
                               args=(writer.producer(), frames[k::producers], go, []))
                   for k in range(producers)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
            assert worker.exitcode == 0
    return writer


def test_inspect_a_complete_file(tmp_path):
    path = tmp_path / "run.rtdc"
    write_run(path, list(range(30)), 30, metadata={"experiment:sample": "inspect test"})
    nevents = sum(nevents_of(f) for f in range(30))

    result = cli("inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert f"events       {nevents} in 30 frames with events (indices 0 to 29)" in result.stdout
    assert "complete     yes" in result.stdout
    assert "experiment:sample = inspect test" in result.stdout

    doc = cli_json("inspect", str(path))
    assert doc["path"] == str(path)
    assert doc["events"] == nevents == doc["event_count"]
    assert (doc["frames"], doc["frames_from"], doc["frame_range"]) == (30, "frame", [0, 29])
    assert doc["complete"] is True and doc["problems"] == []
    assert doc["missing_frames"] == [] and doc["logs"] == ["shmwriter-run"]
    assert doc["metadata"]["experiment:sample"] == "inspect test"
    assert doc["metadata"]["experiment:event count"] == nevents
    datasets = {d["name"]: d for d in doc["datasets"]}
    assert sorted(datasets) == ["frame", "image", "nevents", "x"]
    image = datasets["image"]
    assert (image["dtype"], image["shape"]) == ("uint8", [nevents, 8, 8])
    assert (image["compression"], image["compression_level"]) == ("zstd", 5)
    assert image["filters"] == ["zstd", "fletcher32"] and image["fletcher32"] is True
    # figures checked against the file itself
    with h5py.File(path) as h5:
        for name, ds in h5["events"].items():
            assert datasets[name]["chunks"] == list(ds.chunks)
            assert datasets[name]["nbytes"] == ds.nbytes
            assert datasets[name]["stored_nbytes"] == ds.id.get_storage_size()
        data_nbytes = sum(ds.nbytes for ds in h5["events"].values())
    assert doc["data_nbytes"] == data_nbytes
    assert doc["file_nbytes"] == os.path.getsize(path)
    assert doc["compression_ratio"] == pytest.approx(data_nbytes / os.path.getsize(path))


def test_inspect_shows_the_missing_frames_of_a_run_with_gaps(tmp_path):
    path, lost = tmp_path / "gaps.rtdc", [3, 4, 5, 11, 19]
    delivered = [f for f in range(20) if f not in lost]
    writer = write_run(path, delivered, 20, allow_gaps=True, index_feature="index_unmapped",
                       hdf5_dataset_kwargs={"compression": "gzip", "compression_opts": 4,
                                            "fletcher32": False})
    assert writer.missing_frames == lost

    result = cli("inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert "missing      5: 3-5, 11, 19" in result.stdout

    doc = cli_json("inspect", str(path))
    assert doc["missing_frames"] == lost
    assert doc["logs"] == ["shmwriter-missing-frames", "shmwriter-run"]
    assert doc["complete"] is True  # the run closed cleanly; the gaps are recorded
    assert doc["events"] == sum(nevents_of(f) for f in delivered)
    assert (doc["frames"], doc["frames_from"], doc["frame_range"]) == (
        len(delivered), "index_unmapped", [0, 18])
    image = {d["name"]: d for d in doc["datasets"]}["image"]
    assert (image["compression"], image["compression_level"]) == ("gzip", 4)
    assert image["fletcher32"] is False


def test_inspect_the_file_of_a_killed_writer_is_incomplete(tmp_path):
    path, frames = tmp_path / "killed.rtdc", 12
    ours, theirs = CTX.Pipe()
    owner = CTX.Process(target=own_writer_until_killed, args=(str(path), frames, theirs))
    owner.start()
    name = None
    try:
        assert ours.poll(60), "the owner never reported its segment"
        name = ours.recv()
        os.kill(owner.pid, signal.SIGKILL)
        owner.join(30)
        assert owner.exitcode == -signal.SIGKILL

        result = cli("inspect", str(path))
        assert result.returncode == 1, result.stderr  # 1: readable but not complete
        assert ("complete     NO: the writer did not close the run: it is still writing, or it "
                "was killed") in result.stdout
        doc = cli_json("inspect", str(path))
        assert doc["complete"] is False and doc["event_count"] is None
        # everything flushed before the kill is there
        assert doc["events"] == sum(nevents_of(f) for f in range(frames))
        assert doc["frames"] == frames
        with h5py.File(path, "r", swmr=True) as h5:
            assert h5["events/x"][-1] == events_of(frames - 1)["x"][-1]
    finally:
        if owner.is_alive():
            owner.kill()
            owner.join()
        if name is not None:
            _remove_segment_of_killed_child(name)


def test_inspect_a_dclab_file_with_groups(tmp_path):
    """A file of another writer: no frame index, traces and contours in groups."""
    from dclab.rtdc_dataset import RTDCWriter
    path = tmp_path / "dclab.rtdc"
    with RTDCWriter(path, mode="reset") as hw:
        hw.store_metadata({"experiment": {"sample": "other tool", "run index": 1}})
        hw.store_feature("deform", np.linspace(0.01, 0.1, 10))
        hw.store_feature("trace", {"fl1_raw": np.ones((10, 100), dtype=np.int16)})
        hw.store_feature("contour", [np.array([[1, 2], [3, 4], [5, 6]])] * 10)
    doc = cli_json("inspect", str(path))
    assert (doc["events"], doc["frames"], doc["frame_range"]) == (10, None, None)
    assert doc["complete"] is True
    groups = {g["name"]: g for g in doc["groups"]}
    assert groups["trace"]["datasets"] == 1 and groups["trace"]["nbytes"] == 10 * 100 * 2
    assert groups["contour"]["datasets"] == 10
    assert doc["data_nbytes"] == 10 * 8 + sum(g["nbytes"] for g in doc["groups"])
    text = cli("inspect", str(path)).stdout
    assert "events       10 (no frame index)" in text
    assert "trace: 1 datasets, 2.0 kB of data" in text


def _remove_segment_of_killed_child(name: str) -> None:
    """The killed child registered its segment with our (shared) resource tracker."""
    try:
        posix_ipc.unlink_shared_memory("/" + name)
    except posix_ipc.ExistentialError:
        pass
    resource_tracker.unregister("/" + name, "shared_memory")  # or it warns when we exit


@pytest.mark.parametrize(("make", "message"), [
    (None, "no such file"),
    ("not hdf5\n", "is not an HDF5 file"),
])
def test_inspect_errors_are_one_line(tmp_path, make, message):
    path = tmp_path / "x.rtdc"
    if make is not None:
        path.write_text(make)
    result = cli("inspect", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("shmwriter inspect: error: ") and message in result.stderr
    assert str(path) in result.stderr


def test_inspect_a_bad_argument_is_one_line():
    result = cli("inspect", "--frobnicate", "x.rtdc")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "unrecognized arguments: --frobnicate" in result.stderr


def test_inspect_help_has_an_example():
    result = cli("inspect", "--help")
    assert result.returncode == 0
    assert "shmwriter inspect measurement.rtdc --json" in result.stdout


def test_inspect_an_aborted_run_is_incomplete(tmp_path):
    """A run aborted by an exception closes a valid file, which says it was aborted."""
    path = tmp_path / "aborted.rtdc"
    with pytest.raises(RuntimeError, match="stop"):
        with shmwriter.Writer(path, SCHEMA, total_frames=50, write_threshold=5) as writer:
            producer = writer.producer()
            for frame in range(10):
                producer.put(frame, events_of(frame))
            raise RuntimeError("stop")
    result = cli("inspect", str(path))
    assert result.returncode == 1
    report = cli_json("inspect", str(path))
    assert report["complete"] is False
    aborted = "the run was aborted (an exception in the with block: RuntimeError) after 10 of 50"
    assert any(aborted in p for p in report["problems"])
    assert report["events"] == sum(nevents_of(f) for f in range(10))


def test_inspect_recognises_a_file_of_the_dcnum_compat_writer(tmp_path):
    """Such a file records no end of run (no event count, no run log), as dcnum's own: it is
    reported as a dcnum queue writer's file, complete when its datasets agree."""
    from shmwriter.compat.dcnum import QueueWriterThread
    path, frames = tmp_path / "compat.rtdc", 6
    event_queue = CTX.Queue()
    feat_nevents = np.array([1, 2, 1, 3, 1, 2])
    for frame in range(frames):
        n = int(feat_nevents[frame])
        event_queue.put((frame, {"deform": np.full(n, 0.1 * frame), "area_um": np.arange(n)}))
    writer = QueueWriterThread(event_queue=event_queue, write_queue_size=CTX.Value("L", 0),
                               feat_nevents=feat_nevents, path_out=path, write_threshold=2)
    writer.run()
    result = cli("inspect", str(path))
    assert result.returncode == 0, result.stdout
    assert "complete     yes" in result.stdout
    assert "written by   dcnum queue writer" in result.stdout
    doc = cli_json("inspect", str(path))
    assert doc["origin"] == "dcnum queue writer" and doc["events"] == int(feat_nevents.sum())
