"""shmwriter.compat.dcnum: dcnum's queue writers, checked against dcnum's own files.

dcnum is imported unconditionally: without it this module fails to import and
the tests fail (they must never be skipped).
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import threading

import h5py
import numpy as np
import pytest
from _queue_workers import dcnum_events, put_like_dcnum
from dcnum.write import QueueWriterThread as DcnumQueueWriterThread

import shmwriter
from shmwriter.compat.dcnum import (
    DCNUM_LOG_DATEFMT,
    DCNUM_LOG_FORMAT,
    QueueWriterBase,
    QueueWriterProcess,
    QueueWriterThread,
    end_of_data_message,
    fit_log_text,
)

CTX = multiprocessing.get_context("spawn")
FRAMES = 60
THRESHOLD = 8  # several windows and a partial last one
ORDER = np.random.default_rng(7).permutation(FRAMES).tolist()


def fill(event_queue, feat_nevents, order=ORDER):
    """Put every frame in shuffled order, setting feat_nevents first (as dcnum's workers do)."""
    for frame in order:
        events = dcnum_events(frame)
        feat_nevents[frame] = 0 if events is None else len(events["mask"])
        event_queue.put((frame, events))


def new_feat_nevents(count=FRAMES):
    feat_nevents = CTX.RawArray("l", count)  # what dcnum's SlotRegister uses
    feat_nevents[:] = [-1] * count
    return feat_nevents


def writer_kwargs(event_queue, feat_nevents, path, **kwargs):
    return dict(event_queue=event_queue, write_queue_size=CTX.Value("L", 0),
                feat_nevents=feat_nevents, path_out=path, write_threshold=THRESHOLD, **kwargs)


def run_dcnum(path, feat_nevents=None, order=ORDER):
    event_queue = CTX.Queue()
    feat_nevents = new_feat_nevents() if feat_nevents is None else feat_nevents
    fill(event_queue, feat_nevents, order)
    writer = DcnumQueueWriterThread(**writer_kwargs(event_queue, feat_nevents, path))
    writer.run()
    return writer


def datasets(path):
    """Every dataset of the file: values (as bytes), dtype, shape, layout, filters, attributes."""
    found = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            plist = obj.id.get_create_plist()
            filters = [plist.get_filter(i)[:3] for i in range(plist.get_nfilters())]
            found[name] = {
                "values": obj[()].tobytes(), "dtype": obj.dtype, "shape": obj.shape,
                "chunks": obj.chunks, "maxshape": obj.maxshape, "filters": filters,
                "attrs": {k: v.tobytes() for k, v in obj.attrs.items()},
            }

    with h5py.File(path, "r") as h5:
        h5.visititems(visit)
    return found


def assert_same_datasets(path, reference):
    ours, theirs = datasets(path), datasets(reference)
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        for key in theirs[name]:
            assert ours[name][key] == theirs[name][key], (name, key)


@pytest.fixture
def dcnum_info():
    """The 'dcnum' logger at INFO, which the writers take their log level from."""
    logger = logging.getLogger("dcnum")
    level = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(level)


@pytest.fixture(scope="module")
def dcnum_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dcnum") / "dcnum.rtdc"
    writer = run_dcnum(path)
    assert writer.written_frames.value == FRAMES
    return path


def test_the_reference_holds_what_the_workers_put(dcnum_file):
    """The parity tests compare with this file; make sure it is the real thing."""
    expected = [dcnum_events(frame) for frame in range(FRAMES)]
    with h5py.File(dcnum_file, "r") as h5:
        events = h5["events"]
        assert set(events) == {"mask", "image", "deform", "temp", "area_um", "index_unmapped",
                               "nevents"}
        masks = np.concatenate([e["mask"] for e in expected if e is not None])
        np.testing.assert_array_equal(events["mask"][:], masks.astype(np.uint8) * 255)
        frames = np.concatenate([np.full(len(e["mask"]), i) for i, e in enumerate(expected)
                                 if e is not None])
        np.testing.assert_array_equal(events["index_unmapped"][:], frames)
        assert events["nevents"].dtype == np.int64 and events["index_unmapped"].dtype == np.uint32


def test_thread_with_an_mp_queue_writes_what_dcnum_writes(tmp_path, dcnum_file):
    event_queue, feat_nevents = CTX.Queue(), new_feat_nevents()
    writer = QueueWriterThread(**writer_kwargs(event_queue, feat_nevents, tmp_path / "out.rtdc"))
    writer.start()  # before any frame: it waits while feat_nevents holds -1
    fill(event_queue, feat_nevents)
    writer.join(60)
    assert not writer.is_alive()
    assert_same_datasets(tmp_path / "out.rtdc", dcnum_file)
    nevents = sum(len(e["mask"]) for f in range(FRAMES) if (e := dcnum_events(f)) is not None)
    assert (writer.written_events.value, writer.written_frames.value) == (nevents, FRAMES)
    assert writer.write_queue_size.value == 0


def test_direct_run_with_an_event_queue_writes_what_dcnum_writes(tmp_path, dcnum_file):
    with shmwriter.EventQueue(memory_budget_nbytes=2**20) as event_queue:
        feat_nevents = new_feat_nevents()
        fill(event_queue, feat_nevents)
        writer = QueueWriterThread(**writer_kwargs(event_queue, feat_nevents,
                                                   tmp_path / "out.rtdc"))
        writer.run()  # in this thread, as dcnum's own tests do
        assert event_queue.free_slots == event_queue.slots
    assert_same_datasets(tmp_path / "out.rtdc", dcnum_file)


def test_process_with_spawned_workers_and_an_event_queue(tmp_path, dcnum_file, dcnum_info):
    log_queue = CTX.Queue()
    with shmwriter.EventQueue(memory_budget_nbytes=2**20, slot_events=2) as event_queue:
        feat_nevents = new_feat_nevents()
        writer = QueueWriterProcess(log_queue=log_queue, **writer_kwargs(
            event_queue, feat_nevents, tmp_path / "out.rtdc"))
        assert writer.log_level == logging.INFO  # taken from the 'dcnum' logger, as dcnum does
        writer.start()
        workers = [CTX.Process(target=put_like_dcnum, args=(event_queue, feat_nevents,
                                                            ORDER[k::3])) for k in range(3)]
        for worker in workers:
            worker.start()
        for process in [*workers, writer]:
            process.join(60)
            assert process.exitcode == 0
    assert_same_datasets(tmp_path / "out.rtdc", dcnum_file)
    assert writer.written_frames.value == FRAMES
    messages = []
    while not log_queue.empty():
        messages.append(log_queue.get(timeout=5).getMessage())
    assert messages[0] == "Ready" and any(m.startswith("Counted ") for m in messages)
    assert not any("Traceback" in m for m in messages)


def test_direct_run_with_buffer_dq_like_dcnums_own_test(tmp_path):
    """dcnum's own test: a NumPy feat_nevents, write_threshold 2, frames already buffered."""
    feat_nevents = np.array([1, 3, 1, 5])
    frames = {0: {"deform": np.array([.1]), "area_um": np.array([100])},
              1: {"deform": np.array([.1, .2, .3]), "area_um": np.array([100, 120, 150])},
              2: {"deform": np.array([.1]), "area_um": np.array([100])},
              3: {"deform": np.array([.1, .2, .3, .4, .5]),
                  "area_um": np.array([100, 110, 120, 130, 140])}}
    files = {}
    for name, cls in (("dcnum", DcnumQueueWriterThread), ("ours", QueueWriterThread)):
        event_queue, buffer_dq = CTX.Queue(), collections.deque()
        buffer_dq.extend([(3, frames[3]), (0, frames[0])])
        event_queue.put((2, frames[2]))
        event_queue.put((1, frames[1]))
        files[name] = tmp_path / f"{name}.rtdc"
        writer = cls(event_queue=event_queue, write_queue_size=CTX.Value("L", 0),
                     feat_nevents=feat_nevents, path_out=files[name], write_threshold=2)
        writer.run(buffer_dq=buffer_dq)
    assert_same_datasets(files["ours"], files["dcnum"])
    with h5py.File(files["ours"]) as h5:
        assert h5["events/deform"][:].tolist() == [.1, .1, .2, .3, .1, .1, .2, .3, .4, .5]
        assert h5["events/nevents"][:].tolist() == [1, 3, 3, 3, 1, 5, 5, 5, 5, 5]


def test_constructor_and_attributes_are_dcnums(tmp_path, dcnum_info):
    event_queue, feat_nevents = CTX.Queue(), new_feat_nevents(3)
    size = CTX.Value("L", 0)
    kwargs = {"compression": None}
    writer = QueueWriterThread(event_queue, size, feat_nevents, tmp_path / "o.rtdc", kwargs, 20,
                               daemon=True)
    assert isinstance(writer, QueueWriterBase) and isinstance(writer, threading.Thread)
    assert writer.name == "QueueWriterThread" and writer.daemon
    assert writer.event_queue is event_queue and writer.write_queue_size is size
    assert writer.feat_nevents is feat_nevents and writer.path_out == tmp_path / "o.rtdc"
    assert writer.hdf5_dataset_kwargs is kwargs and writer.write_threshold == 20
    assert writer.log_level == logging.INFO
    for value in (writer.written_events, writer.written_frames):
        assert value.value == 0 and value.get_lock() is not None
    assert writer.get_logger().level == logging.INFO
    process = QueueWriterProcess(CTX.Queue(), event_queue, size, feat_nevents, tmp_path / "p")
    assert process.name == "QueueWriterProcess" and process.write_threshold == 500
    assert isinstance(process, CTX.Process)
    with pytest.raises(ValueError, match="write_threshold must be a positive integer; got 0"):
        QueueWriterThread(event_queue, size, feat_nevents, tmp_path / "o.rtdc", None, 0)


def test_a_frame_that_does_not_match_feat_nevents_is_named(tmp_path):
    event_queue, feat_nevents = CTX.Queue(), new_feat_nevents(4)
    feat_nevents[:] = [1, 2, 1, 1]
    for frame in range(4):
        event_queue.put((frame, {"deform": np.ones(1)}))  # frame 1 brings 1 event, not 2
    writer = QueueWriterThread(**writer_kwargs(event_queue, feat_nevents, tmp_path / "o.rtdc"))
    with pytest.raises(ValueError, match=r"frame 1: feat_nevents\[1\] is 2 but the event queue "
                                         r"delivered 1 event"):
        writer.run()


def test_a_feature_appearing_late_is_named(tmp_path):
    event_queue, feat_nevents = CTX.Queue(), new_feat_nevents(4)
    feat_nevents[:] = [1, 1, 1, 1]
    for frame in range(4):
        events = {"deform": np.ones(1)}
        if frame == 3:
            events["area_um"] = np.ones(1)
        event_queue.put((frame, events))
    writer = QueueWriterThread(**writer_kwargs(event_queue, feat_nevents, tmp_path / "o.rtdc",
                                               hdf5_dataset_kwargs={"compression": None}))
    writer.write_threshold = 2
    with pytest.raises(ValueError, match="frame 3: feature 'area_um' first appears here"):
        writer.run()
    with h5py.File(tmp_path / "o.rtdc") as h5:  # the frames before are in the file
        assert h5["events/deform"].shape == (2,)


def test_process_writer_logs_its_failure_to_the_log_queue_and_exits_nonzero(tmp_path, dcnum_info):
    """A failed writer process says so twice: a traceback in log_queue and exit code 1.

    (dcnum's own QueueWriterProcess logs the traceback but exits with 0, so its
    parent cannot tell a failed writer from a finished one.)
    """
    event_queue, feat_nevents, log_queue = CTX.Queue(), new_feat_nevents(2), CTX.Queue()
    feat_nevents[:] = [1, 1]
    event_queue.put((0, {"deform": np.ones(1)}))
    event_queue.put((1, {"deform": np.ones(2)}))
    writer = QueueWriterProcess(log_queue, **writer_kwargs(event_queue, feat_nevents,
                                                           tmp_path / "o.rtdc"))
    writer.start()
    writer.join(60)
    assert writer.exitcode == 1
    records = []
    while not log_queue.empty():
        records.append(log_queue.get(timeout=5))
    assert records[0].getMessage() == "Ready"
    assert {r.name for r in records} == {"dcnum.write.QueueWriterProcess"}
    errors = [r.getMessage() for r in records if r.levelno == logging.ERROR]
    expected = "ValueError: frame 1: feat_nevents[1] is 1 but the event queue delivered 2 event(s)"
    assert len(errors) == 1 and "Traceback (most recent call last)" in errors[0]
    assert expected in errors[0].replace("\n", "")  # the line may be wrapped to fit the log
    assert not any(r.getMessage().startswith("Counted ") for r in records)


def dcnum_log_lines(records):
    """The lines dcnum's runner writes for ``records`` (its log file, later /logs in the output)."""
    formatter = logging.Formatter(fmt=DCNUM_LOG_FORMAT, datefmt=DCNUM_LOG_DATEFMT)
    return [line for record in records for line in formatter.format(record).split("\n")]


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.mark.parametrize("name_length", [5, 30, 60, 80])
def test_log_lines_fit_dcnums_limit_for_any_logger_name(tmp_path, name_length):
    """Every record of a run, failures' tracebacks included, fits 100 characters a line.

    The runs go through a caller's logger (``run(logger=...)``) whose name is
    ``name_length`` characters long: one fails at a frame, one cannot create
    its file in a missing directory with a 150-character name (a long path in
    the traceback, without a space to break at).
    """
    logger = logging.getLogger(("dcnum." + "x" * 90)[:name_length])
    logger.setLevel(logging.DEBUG)
    handler = ListHandler()
    logger.addHandler(handler)
    missing = tmp_path / ("d" * 150) / "o.rtdc"
    try:
        event_queue, feat_nevents = CTX.Queue(), new_feat_nevents(3)
        feat_nevents[:] = [1, 1, 1]
        for frame in range(3):
            event_queue.put((frame, {"deform": np.ones(1 if frame < 2 else 2)}))
        writer = QueueWriterThread(**writer_kwargs(event_queue, feat_nevents, tmp_path / "o.rtdc"))
        writer.write_threshold = 2
        with pytest.raises(ValueError, match="frame 2"):
            writer.run(writer_dq=collections.deque(), logger=logger)
        writer = QueueWriterThread(**writer_kwargs(CTX.Queue(), new_feat_nevents(1), missing))
        with pytest.raises(OSError, match="d" * 150):
            writer.run(logger=logger)
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in handler.records]
    errors = [m for m in messages if "Traceback" in m]
    assert len(errors) == 2 and any("writer_dq" in m for m in messages), messages
    lines = dcnum_log_lines(handler.records)
    assert max(len(line) for line in lines) <= 100, [line for line in lines if len(line) > 100]
    # nothing was cut off: once unwrapped, the tracebacks hold the error and the path in full
    unwrapped = ["".join(error.split()) for error in errors]
    assert "ValueError:frame2:feat_nevents[2]is1buttheeventqueuedelivered2event(s)" in unwrapped[0]
    assert str(missing) in unwrapped[1]


@pytest.mark.parametrize("total", [40, 10**6, 10**15, 10**18])
def test_end_of_data_message_fits_for_any_run_length(total):
    """The longest message of a run, "Reached dataset end (frame N of N)", for huge N."""
    for cls in ("QueueWriterThread", "QueueWriterProcess", "A" * 60):
        name = f"dcnum.write.{cls}"
        text = fit_log_text(name, logging.INFO, end_of_data_message(total, total))
        record = logging.LogRecord(name, logging.INFO, __file__, 1, text, None, None)
        lines = dcnum_log_lines([record])
        assert max(len(line) for line in lines) <= 100, lines
        assert "".join(text.split()) == f"Reacheddatasetend(frame{total}of{total})"
    assert end_of_data_message(40, 40) == "Reached dataset end (frame 40 of 40)"  # as dcnum


def test_thread_writer_records_reach_dcnums_logger_errors_included(tmp_path, dcnum_info):
    """As dcnum's runner does, a handler on the 'dcnum' logger receives the writer's records."""
    handler = ListHandler()
    dcnum_logger = logging.getLogger("dcnum")
    dcnum_logger.addHandler(handler)
    try:
        event_queue, feat_nevents = CTX.Queue(), new_feat_nevents(4)
        feat_nevents[:] = [1, 2, 1, 1]
        for frame in range(4):
            event_queue.put((frame, {"deform": np.ones(1)}))  # frame 1 brings 1 event, not 2
        writer = QueueWriterThread(**writer_kwargs(event_queue, feat_nevents,
                                                   tmp_path / "o.rtdc"))
        with pytest.raises(ValueError, match=r"frame 1: feat_nevents\[1\] is 2"):
            writer.run()
        good_queue, good_nevents = CTX.Queue(), new_feat_nevents()
        fill(good_queue, good_nevents)
        good = QueueWriterThread(**writer_kwargs(good_queue, good_nevents, tmp_path / "g.rtdc"))
        good.run()
    finally:
        dcnum_logger.removeHandler(handler)
    assert {r.name for r in handler.records} == {"dcnum.write.QueueWriterThread"}
    errors = [r.getMessage() for r in handler.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "Traceback" in errors[0]
    assert "ValueError: frame 1: feat_nevents[1] is 2" in errors[0].replace("\n", "")
    infos = [r.getMessage() for r in handler.records if r.levelno == logging.INFO]
    assert infos == [f"Reached dataset end (frame {FRAMES} of {FRAMES})",
                     f"Counted {good.written_events.value} events"]


@pytest.mark.parametrize("events_from", [20, None], ids=["first-windows-empty", "no-events"])
def test_windows_without_events_match_dcnum(tmp_path, events_from):
    """Datasets appear when the first events do; a run without events has only the derived two."""
    order = list(range(30))

    def events(frame):
        if events_from is None or frame < events_from:
            return None
        return dcnum_events(frame) or {"deform": np.zeros(0), "mask": np.zeros((0, 8, 10), bool)}

    files = {}
    for name, cls in (("dcnum", DcnumQueueWriterThread), ("ours", QueueWriterThread)):
        event_queue, feat_nevents = CTX.Queue(), new_feat_nevents(len(order))
        for frame in order:
            frame_events = events(frame)
            feat_nevents[frame] = len(frame_events["mask"]) if frame_events else 0
            event_queue.put((frame, frame_events))
        files[name] = tmp_path / f"{name}.rtdc"
        cls(**writer_kwargs(event_queue, feat_nevents, files[name])).run()
    assert_same_datasets(files["ours"], files["dcnum"])
    with h5py.File(files["ours"]) as h5:
        expected = {"index_unmapped", "nevents"} if events_from is None else {
            "mask", "image", "deform", "temp", "area_um", "index_unmapped", "nevents"}
        assert set(h5["events"]) == expected
