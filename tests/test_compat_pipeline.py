"""dcnum 0.31's own pipeline (DCNumJobRunner) with shmwriter's writers and EventQueue swapped in.

The runner makes its writer from the names ``QueueWriterThread`` (debug mode)
and ``QueueWriterProcess`` of ``dcnum.logic.ctrl`` and its event queue with
``mp_spawn.Queue()`` of that module; the tests replace those names, run a real
pipeline on dcnum's small test measurement (40 frames) and read the output
file back: its logs (the runner's log file, stored in /logs) and dclab's
verdict. dcnum is imported unconditionally: without it these tests fail.
"""

from __future__ import annotations

import logging
import pathlib
import zipfile

import dclab
import h5py
import numpy as np
import pytest
from dcnum.logic import DCNumJobRunner, DCNumPipelineJob
from dcnum.logic import ctrl as dcnum_ctrl

import shmwriter
from shmwriter.compat import dcnum as compat

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "dcnum-testdata"
ZIP = DATA / "fmt-hdf5_cytoshot_full-features_2023.zip"


class _EventQueueContext:
    """dcnum's spawn context, except that ``Queue()`` makes a shmwriter.EventQueue."""

    def __init__(self, context, made):
        self._context, self._made = context, made

    def Queue(self, *args, **kwargs):  # the name dcnum calls
        event_queue = shmwriter.EventQueue()
        self._made.append(event_queue)
        return event_queue

    def __getattr__(self, name):
        return getattr(self._context, name)


@pytest.fixture(scope="module")
def measurement(tmp_path_factory):
    """dcnum's test measurement (40 frames with images), unzipped."""
    folder = tmp_path_factory.mktemp("dcnum-input")
    with zipfile.ZipFile(ZIP) as archive:
        archive.extractall(folder)
    return folder / "cytoshot-test-data.rtdc"


@pytest.fixture
def dcnum_logger_restored():
    """The runner sets the level of the 'dcnum' logger; put it back afterwards."""
    logger = logging.getLogger("dcnum")
    level = logger.level
    yield
    logger.setLevel(level)


def run_pipeline(measurement, path_out, monkeypatch, *, debug):
    """Run dcnum's pipeline with shmwriter's writer and EventQueue; return writer and queues."""
    writers, queues = [], []

    def make(cls):
        def factory(**kwargs):
            writers.append(cls(**kwargs))
            return writers[-1]
        return factory

    monkeypatch.setattr(dcnum_ctrl, "QueueWriterThread", make(compat.QueueWriterThread))
    monkeypatch.setattr(dcnum_ctrl, "QueueWriterProcess", make(compat.QueueWriterProcess))
    job = DCNumPipelineJob(path_in=measurement, path_out=path_out, background_code="copy",
                           debug=debug)
    try:
        with DCNumJobRunner(job, tmp_suffix="test") as runner:
            # after the runner made its log queue: only the event queue is an EventQueue
            monkeypatch.setattr(dcnum_ctrl, "mp_spawn",
                                _EventQueueContext(dcnum_ctrl.mp_spawn, queues))
            runner.run()
            monkeypatch.undo()
        assert runner.error_tb is None, runner.error_tb
        assert runner.state == "done"
    finally:
        for event_queue in queues:
            event_queue.close()
    assert len(writers) == 1 and len(queues) == 1
    assert writers[0].event_queue is queues[0]
    return writers[0]


def log_lines(path):
    """The lines of the pipeline's log (the runner's log file) stored in the output file."""
    with h5py.File(path, "r") as h5:
        names = [name for name in h5["logs"] if name.startswith("dcnum-log-")]
        assert len(names) == 1, list(h5["logs"])
        return [line.decode() if isinstance(line, bytes) else line
                for line in h5["logs"][names[0]][:]]


def check(path):
    """dclab's alerts about the file's format, and its event count."""
    _, alerts, _ = dclab.rtdc_dataset.check_dataset(path)
    with dclab.new_dataset(path) as ds:
        return alerts, len(ds)


def test_pipeline_log_lines_fit_dclabs_limit_with_the_process_writer(measurement, tmp_path,
                                                                     monkeypatch,
                                                                     dcnum_logger_restored):
    """QueueWriterProcess + EventQueue in dcnum's pipeline: no log line over 100 characters."""
    path = tmp_path / "out.rtdc"
    writer = run_pipeline(measurement, path, monkeypatch, debug=False)
    assert isinstance(writer, compat.QueueWriterProcess)  # joined and closed by the runner
    lines = log_lines(path)
    assert [line for line in lines if len(line) > 100] == []
    alerts, nevents = check(path)
    assert [alert for alert in alerts if "line length" in alert] == []
    ours = [line for line in lines if " dcnum.write.QueueWriterProcess: " in line]
    assert [line.split(": ", 1)[1] for line in ours] == [
        "Ready", "Reached dataset end (frame 40 of 40)",
        f"Counted {writer.written_events.value} events"]
    assert nevents == writer.written_events.value > 0
    with h5py.File(path, "r") as h5:  # the runner mapped index_unmapped to basinmap0
        assert np.all(np.diff(h5["events/basinmap0"][:].astype(int)) >= 0)
        assert len(h5["events/deform"]) == nevents


def test_pipeline_in_debug_mode_logs_the_thread_writers_records(measurement, tmp_path,
                                                                monkeypatch,
                                                                dcnum_logger_restored):
    """QueueWriterThread (dcnum's debug mode) leaves its records in the pipeline's log."""
    path = tmp_path / "out.rtdc"
    writer = run_pipeline(measurement, path, monkeypatch, debug=True)
    assert isinstance(writer, compat.QueueWriterThread)
    lines = log_lines(path)
    ours = {number: line for number, line in enumerate(lines)
            if " dcnum.write.QueueWriterThread: " in line}
    assert [line.split(": ", 1)[1] for line in ours.values()] == [
        "Reached dataset end (frame 40 of 40)", f"Counted {writer.written_events.value} events",
        "Counted 40 frames"]
    alerts, nevents = check(path)
    assert nevents == writer.written_events.value > 0
    # dcnum's own debug-mode lines are too long (its environment warnings); ours are not
    assert all(len(line) <= 100 for line in ours.values())
    assert not [alert for alert in alerts
                if any(alert.endswith(f" line {number} exceeds maximum line length 100")
                       for number in ours)]

