"""``shmwriter bench`` through its real entry point, tiny; the files it writes are read back.

Timings are never asserted: only that every figure is there, positive, and
that every writer wrote the same events.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import testdata_dir as data_folder

from shmwriter.bench._work import BENCH_SCHEMA, PERIOD_FRAMES, Workload, load_workload
from shmwriter.bench.config import BLOCK_WRITERS, BenchConfig

DATA_DIR = str(data_folder())

FRAMES = 200
WRITERS = ("shmwriter-thread", "shmwriter-process", "dcnum", "shmwriter-blocks",
           "shmwriter-batched", "shmwriter-frames", "dcnum-blocks", "h5py")
SHMWRITERS = tuple(w for w in WRITERS if w.startswith("shmwriter"))
FILTERS = ("uncompressed", "zstd5")
FIGURES = ("events_per_s", "mb_per_s", "wall_s", "cpu_s", "writer_cpu_s", "writer_cpu_s_per_gb",
           "baseline_memory_nbytes", "data_nbytes", "file_nbytes")
SUMMARY_FIGURES = ("events_per_s", "mb_per_s", "wall_s", "cpu_s", "writer_cpu_s_per_gb",
                   "peak_memory_nbytes")
FLETCHER32, ZSTD = 3, 32015


def bench(*args: str, python_prefix: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess,
                                                                    int]:
    """Run the bench command; returns its result and its pid (for the /dev/shm check)."""
    if python_prefix:
        command = [sys.executable, *python_prefix]
    else:
        script = os.path.join(os.path.dirname(sys.executable), "shmwriter")
        command = [script] if os.path.exists(script) else [sys.executable, "-m", "shmwriter"]
    process = subprocess.Popen([*command, "bench", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=240)
    finally:
        process.kill()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), \
        process.pid


def segments_of(pid: int) -> list[str]:
    return [name for name in os.listdir("/dev/shm") if name.startswith(f"shmw_{pid}_")]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One tiny full comparison: every writer, both filter settings, the micro-benchmark."""
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "out.json"
    result, pid = bench("--frames", str(FRAMES), "--repeat", "1", "--overhead-frames", "500",
                        "--json", str(out), "--workdir", str(tmp / "files"), "--keep-files",
                        "--data", DATA_DIR, "--quiet")
    assert result.returncode == 0, result.stderr
    assert segments_of(pid) == []
    return result, json.loads(out.read_text())


def test_every_figure_for_every_writer_and_filter_setting(full_run):
    _, data = full_run
    runs = {(r["filters"], r["writer"]): r for r in data["runs"]}
    assert sorted(runs) == sorted((f, w) for f in FILTERS for w in WRITERS)
    for run in runs.values():
        for name in FIGURES:
            assert run[name] > 0, (run["writer"], run["filters"], name)
        # a timed run samples no memory: that would take CPU from the writer it times
        assert run["peak_memory_nbytes"] is None and run["memory"] == []
        assert run["progress"] and run["progress"][-1][1] == run["events"]
        assert (run["producers_s"] is None) == (run["writer"] == "h5py")
    memory_runs = {(r["filters"], r["writer"]): r for r in data["memory_runs"]}
    assert sorted(memory_runs) == sorted(runs) and len(data["memory_runs"]) == len(runs)
    for run in memory_runs.values():
        assert run["peak_memory_nbytes"] >= run["baseline_memory_nbytes"] > 0
        assert run["memory"] and min(pss for _, pss in run["memory"]) > 0
        assert run["file_events"] == run["events"]
    summaries = {(s["filters"], s["writer"]): s for s in data["summaries"]}
    assert sorted(summaries) == sorted(runs)
    for key, summary in summaries.items():
        assert summary["repetitions"] == 1
        for name in SUMMARY_FIGURES:
            assert summary[name] > 0
        assert summary["peak_memory_nbytes"] == memory_runs[key]["peak_memory_nbytes"]
    for filters in FILTERS:
        assert sorted(data["ratios"][filters]) == sorted(SHMWRITERS)
        for writer in SHMWRITERS:
            ratios = data["ratios"][filters][writer]
            # the block rows compare with dcnum fed by the same blocks, the others with dcnum
            baseline = "dcnum-blocks" if writer in BLOCK_WRITERS else "dcnum"
            assert ratios["events_per_s_vs_dcnum"] == pytest.approx(
                summaries[filters, writer]["events_per_s"]
                / summaries[filters, baseline]["events_per_s"])
            for name in ("events_per_s_vs_dcnum", "events_per_s_vs_h5py",
                         "writer_cpu_per_gb_vs_dcnum"):
                assert ratios[name] > 0
    for key, batch in (("overhead", 0), ("overhead_batched", 100)):
        overhead = data[key]
        assert overhead.pop("frames") == 500
        assert overhead.pop("mode") == "process"  # the first of --modes: the Writer's default
        assert overhead.pop("batch_frames") == batch
        assert all(value > 0 for value in overhead.values()), overhead
    assert data["warnings"] == []
    assert data["consistent"] is True


def test_every_writer_wrote_the_same_events(full_run):
    _, data = full_run
    expected = int(load_workload(DATA_DIR).frame_nevents(FRAMES).sum())
    assert expected > 0
    for filters in FILTERS:
        runs = [r for r in data["runs"] if r["filters"] == filters]
        first = None
        for run in runs:
            assert run["events"] == run["file_events"] == expected
            with h5py.File(run["path"], "r") as h5:
                events = h5["events"]
                assert len(events["image"]) == len(events["mask"]) == expected
                assert len(events["deform"]) == expected
                arrays = {name: events[name][:] for name in ("image", "mask", "deform")}
                image = events["image"]
                assert image.chunks == tuple(run["image_chunks"])
                assert image.fletcher32
            if first is None:
                first = arrays
            for name, array in arrays.items():  # the same events, in the same order
                np.testing.assert_array_equal(array, first[name], err_msg=(run["writer"], name))
        assert {tuple(r["image_chunks"]) for r in runs} == {(52, 80, 250)}
        filter_ids = {tuple(r["image_filters"]) for r in runs}
        assert filter_ids == ({(FLETCHER32,)} if filters == "uncompressed"
                              else {(ZSTD, FLETCHER32)})


def test_report_names_the_workload_and_the_writers(full_run):
    result, data = full_run
    assert data["workload"].startswith("real: ") == os.path.isdir(DATA_DIR)
    assert f"workload: {data['workload']}" in result.stdout
    for label in ("shmwriter (thread)", "shmwriter (process)", "dcnum QueueWriterThread",
                  "plain h5py (limit)", "uncompressed + fletcher32", "Zstd-5 + fletcher32",
                  "descriptor path (500 empty frames, put one by one",
                  "descriptor path (500 empty frames, put_many of 100"):
        assert label in result.stdout
    assert "WARNING" not in result.stdout + result.stderr


def test_without_dcnum_the_fallback_writer_and_loud_warnings(tmp_path):
    """dcnum hidden from the import system: warned at the start and in the table."""
    out = tmp_path / "out.json"
    hide_dcnum = ("import sys; sys.modules['dcnum'] = None; from shmwriter.cli import main; "
                  "sys.exit(main(sys.argv[1:]))")
    result, pid = bench("--frames", "150", "--repeat", "1", "--modes", "thread", "--filters",
                        "uncompressed", "--overhead-frames", "0", "--data",
                        str(tmp_path / "no-data"), "--json", str(out), "--quiet",
                        python_prefix=("-c", hide_dcnum))
    assert result.returncode == 0, result.stderr
    assert segments_of(pid) == []
    assert result.stderr.startswith("WARNING: dcnum is not installed")
    assert result.stdout.startswith("WARNING: dcnum is not installed")
    assert "pickling writer (dcnum ABSENT)" in result.stdout
    assert "workload: synthetic" in result.stdout
    data = json.loads(out.read_text())
    assert [r["writer"] for r in data["runs"]] == ["shmwriter-thread", "dcnum",
                                                   "shmwriter-blocks", "shmwriter-batched",
                                                   "shmwriter-frames", "dcnum-blocks", "h5py"]
    counts = {r["file_events"] for r in data["runs"]} | {r["events"] for r in data["runs"]}
    assert len(counts) == 1 and counts.pop() > 0
    assert data["overhead"] is None and data["overhead_batched"] is None


def test_memory_scaling_covers_every_workload_and_filter_setting(tmp_path):
    out = tmp_path / "out.json"
    result, pid = bench("--frames", "40", "--repeat", "1", "--modes", "thread",
                        "--batch-frames", "10", "--overhead-frames", "0", "--memory-scaling",
                        "--scaling-frames", "40,80", "--data", DATA_DIR, "--json", str(out),
                        "--quiet")
    assert result.returncode == 0, result.stderr
    assert segments_of(pid) == []
    data = json.loads(out.read_text())
    writers = ("shmwriter-thread", "shmwriter-blocks", "shmwriter-batched", "dcnum")
    assert sorted((r["filters"], r["writer"], r["frames"]) for r in data["scaling"]) == sorted(
        (f, w, n) for f in FILTERS for w in writers for n in (40, 80))
    for filters in FILTERS:
        assert sorted(data["scaling_ratios"][filters]) == sorted(writers)
        for ratios in data["scaling_ratios"][filters].values():
            assert ratios["peak"] > 0 and ratios["peak_over_baseline"] >= 0  # tiny runs: ~0
    assert "blocks: shmwriter put_many (process)" in result.stdout
    assert "memory scaling" in result.stdout


def test_bad_arguments_are_one_line_errors():
    result, _ = bench("--modes", "thread,fiber")
    assert result.returncode == 2
    assert "expected a comma-separated list of thread, process; got 'thread,fiber'" \
        in result.stderr


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"frames": 0}, ValueError, "frames must be at least 1; got 0"),
    ({"repeat": 2.5}, TypeError, "repeat must be an int; got 2.5"),
    ({"modes": ("thread", "fiber")}, ValueError, "modes must be a non-empty tuple"),
    ({"filters": ()}, ValueError, "filters must be a non-empty tuple"),
    ({"overhead_frames": -1}, ValueError, "overhead_frames must be at least 0; got -1"),
])
def test_config_checks_its_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        BenchConfig(**kwargs)


def test_workload_is_reproducible_and_realistic():
    workload = load_workload(DATA_DIR, seed=7)
    again = load_workload(DATA_DIR, seed=7)
    for index in range(PERIOD_FRAMES):
        first, second = workload.template(index), again.template(index)
        assert (first is None) == (second is None)
        if first is not None:
            assert set(first) == set(BENCH_SCHEMA)
            for name, array in first.items():
                np.testing.assert_array_equal(array, second[name])
                assert array.dtype == BENCH_SCHEMA[name].dtype
                assert array.shape[1:] == BENCH_SCHEMA[name].shape
    counts = workload.frame_nevents(3 * PERIOD_FRAMES)
    assert set(np.unique(counts)) == {0, 1, 2, 3}
    assert 39_000 < BENCH_SCHEMA.event_nbytes < 41_000
    assert workload.masks.any(axis=(1, 2)).all()  # cropping kept every cell
    arrays = workload.file_arrays(10)
    assert len(arrays["image"]) == len(arrays["frame"]) == counts[:10].sum()
    assert set(np.unique(arrays["mask"])) <= {0, 255}


def test_workload_checks_its_pool():
    images = np.zeros((2, 80, 250), np.uint8)
    with pytest.raises(ValueError, match=r"images must be a non-empty \(n, 80, 250\) uint8"):
        Workload(images[:, :10], np.zeros((2, 80, 10), bool), "test")
    with pytest.raises(ValueError, match="masks must be a bool array of shape"):
        Workload(images, np.zeros((2, 80, 250), np.uint8), "test")


def test_the_other_commands_import_none_of_the_benchmark(tmp_path):
    """The benchmark lab is a subpackage only ``shmwriter bench`` loads."""
    probe = ("import sys\nfrom shmwriter.cli import main\n"
             "code = main(['inspect', sys.argv[1]])\n"
             "loaded = sorted(m for m in sys.modules if m.startswith('shmwriter.bench'))\n"
             "print(loaded)\n")
    path = tmp_path / "out.rtdc"
    import shmwriter
    with shmwriter.Writer(path, BENCH_SCHEMA, total_frames=1) as writer:
        with writer.producer() as producer:
            producer.put(0, None)
    result = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_shmwriter_rows_say_where_the_cpu_goes(full_run):
    result, data = full_run
    stages = {"producers", "descriptors", "gather", "encode", "hdf5"}
    for summary in data["summaries"]:
        per_gb = summary["stage_cpu_s_per_gb"]
        if summary["writer"].startswith("shmwriter-"):
            assert set(per_gb) == stages, summary["writer"]
            assert per_gb["gather"] > 0 and per_gb["hdf5"] > 0 and per_gb["producers"] > 0
        else:
            assert per_gb == {}
    assert "where the CPU goes" in result.stdout
    assert "| checksums + compression | HDF5 write + close |" in result.stdout
