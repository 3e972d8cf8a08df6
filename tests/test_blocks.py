"""BlockPlan, and merge_runs of parts that share a run by blocks (as node-local writers do)."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest
from _workers import SCHEMA, events_of, nevents_of
from test_merge import LOGS, METADATA, assert_same_file, check_report, write_run

import shmwriter
from shmwriter import FrameRanges
from shmwriter._blocks import PART_LOG, BlockPlan
from shmwriter._write.h5sink import seal_killed_file
from shmwriter.merge import merge_runs


def test_every_frame_has_one_part_and_one_place_in_it():
    plan = BlockPlan(total_frames=23, frames_per_block=4, parts=3)
    assert [list(b) for b in plan.blocks(2)] == [[8, 9, 10, 11], [20, 21, 22]]
    assert [plan.part_frames(k) for k in range(3)] == [8, 8, 7]
    seen = {k: [] for k in range(3)}
    for frame in range(23):
        part = plan.part_of(frame)
        seen[part].append(plan.to_part(frame))
        assert plan.to_run(part, plan.to_part(frame)) == frame
    assert all(seen[k] == list(range(plan.part_frames(k))) for k in range(3))
    assert list(plan.to_run_ranges(1, [(2, 6)])) == [6, 7, 16, 17]


def test_a_plan_survives_its_log_and_a_bad_log_is_refused():
    plan = BlockPlan(total_frames=10, frames_per_block=3, parts=2)
    assert BlockPlan.from_log(plan.log_lines(1)) == (plan, 1)
    assert all(len(line) <= 100 for line in plan.log_lines(1))
    with pytest.raises(ValueError, match="not a block plan"):
        BlockPlan.from_log(["part=2", "parts=2", "frames_per_block=3", "total_frames=10"])
    with pytest.raises(ValueError, match="frames_per_block must be a positive integer"):
        BlockPlan(total_frames=10, frames_per_block=0, parts=2)


def write_parts(tmp_path, plan, *, missing=(), kwargs=None, lost_after=None):
    """The run's frames in ``plan.parts`` Writers, each putting its blocks' frames as its own;
    part 0's run is aborted after run frame ``lost_after`` (its node was lost)."""
    paths = []
    for part in range(plan.parts):
        paths.append(tmp_path / f"part{part}.rtdc")
        with shmwriter.Writer(paths[-1], SCHEMA, total_frames=plan.part_frames(part),
                              mode="thread", write_threshold=7, metadata=METADATA,
                              allow_gaps=True, logs={**LOGS, PART_LOG: plan.log_lines(part)},
                              hdf5_dataset_kwargs=kwargs) as writer:
            with writer.producer() as producer:
                for frame in (f for block in plan.blocks(part) for f in block):
                    if frame not in missing:
                        producer.put(plan.to_part(frame), events_of(frame))
                    if part == 0 and frame == lost_after:
                        writer.abort()
                        break
    return paths


@pytest.mark.parametrize("kwargs", [None, {"compression": None}])
def test_parts_written_by_blocks_merge_into_the_file_of_one_writer(tmp_path, kwargs):
    plan, missing = BlockPlan(total_frames=57, frames_per_block=10, parts=2), {3, 14, 15, 56}
    write_run(tmp_path / "whole.rtdc", 0, 57, missing=missing, kwargs=kwargs)
    parts = write_parts(tmp_path, plan, missing=missing, kwargs=kwargs)
    placed = merge_runs(tmp_path / "merged.rtdc", parts[::-1])  # any order: the logs tell
    assert [(p.first_frame, p.frames) for p in placed] == [(0, 30), (10, 27)]
    assert [list(p.missing_frames) for p in placed] == [[3], [14, 15, 56]]
    assert_same_file(tmp_path / "merged.rtdc", tmp_path / "whole.rtdc")
    assert check_report(tmp_path / "merged.rtdc") == check_report(tmp_path / "whole.rtdc")


def test_an_aborted_part_of_a_plan_leaves_its_frames_not_done_missing(tmp_path):
    plan = BlockPlan(total_frames=80, frames_per_block=10, parts=2)
    parts = write_parts(tmp_path, plan, lost_after=40)  # part 0 put 0..9, 20..29 and 40
    placed = merge_runs(tmp_path / "merged.rtdc", parts)
    missing = [*range(41, 50), *range(60, 70)]
    assert list(placed[0].missing_frames) == missing and not placed[1].missing_frames
    with h5py.File(tmp_path / "merged.rtdc") as h5:
        assert set(h5["events/frame"][:]) == {f for f in range(80) if f not in missing
                                              and events_of(f) is not None}
        assert h5["logs/shmwriter-missing-frames"].asstr()[:].tolist() == ["41-49", "60-69"]
        assert "state=ABORTED" in h5["logs/shmwriter-run"].asstr()[:].tolist()
    write_run(tmp_path / "whole.rtdc", 0, 40)  # dclab finds in it what it finds in ours
    assert check_report(tmp_path / "merged.rtdc")[0] == check_report(tmp_path / "whole.rtdc")[0]


def test_a_plan_with_a_part_missing_or_twice_is_refused(tmp_path):
    plan = BlockPlan(total_frames=30, frames_per_block=5, parts=3)
    parts = write_parts(tmp_path, plan)
    with pytest.raises(ValueError, match=r"needs parts 0..2 once each; got parts \[0, 2\]"):
        merge_runs(tmp_path / "merged.rtdc", [parts[0], parts[2]])
    other = tmp_path / "plain.rtdc"
    write_run(other, 0, 10)
    with pytest.raises(ValueError, match="different block plans"):
        merge_runs(tmp_path / "merged.rtdc", [parts[0], other])


def test_the_merge_command_takes_parts_of_a_plan(tmp_path):
    plan = BlockPlan(total_frames=33, frames_per_block=4, parts=3)
    write_run(tmp_path / "whole.rtdc", 0, 33)
    parts = write_parts(tmp_path, plan)
    result = subprocess.run([sys.executable, "-m", "shmwriter", "merge",
                             str(tmp_path / "m.rtdc"), *map(str, parts)], capture_output=True,
                            text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert f"33 frames from 3 parts -> {tmp_path / 'm.rtdc'} (" in result.stdout
    assert_same_file(tmp_path / "m.rtdc", tmp_path / "whole.rtdc")


def test_a_plan_with_more_parts_than_blocks_is_refused():
    with pytest.raises(ValueError, match=r"make 2 block\(s\), fewer than the 3 parts"):
        BlockPlan(total_frames=15, frames_per_block=10, parts=3)
    with pytest.raises(ValueError, match=r"frame must be in 0..14; got -1"):
        BlockPlan(total_frames=15, frames_per_block=10, parts=1).to_part(-1)


def test_an_aborted_part_with_a_gap_and_an_empty_frame_after_it_merges(tmp_path):
    """Frame 5 never came, frame 6 has no events, then the run was aborted: the part's
    missing-frames log and its frames not done overlap, and sealing leaves it as it is."""
    plan = BlockPlan(total_frames=20, frames_per_block=10, parts=2)
    path = tmp_path / "part0.rtdc"
    with shmwriter.Writer(path, SCHEMA, total_frames=10, mode="thread", allow_gaps=True,
                          logs={PART_LOG: plan.log_lines(0)}) as writer:
        with writer.producer() as producer:
            for frame in (0, 1, 2, 3, 4, 6):
                producer.put(frame, events_of(frame) if frame != 6 else None)
        writer.abort()
    before = path.read_bytes()
    assert seal_killed_file(str(path), total_frames=10, logs={}, reason="x") == -1
    assert path.read_bytes() == before
    other = tmp_path / "other"
    other.mkdir()
    parts = [path, write_parts(other, plan)[1]]
    placed = merge_runs(tmp_path / "merged.rtdc", parts)
    assert list(placed[0].missing_frames) == [5, *range(7, 10)]
    # the merged file is itself a file merge_runs takes again, with the same frames missing
    again = merge_runs(tmp_path / "again.rtdc", [tmp_path / "merged.rtdc"])
    assert again[0].missing_frames == FrameRanges(
        sorted(s for p in placed for s in p.missing_frames.spans))


def test_a_killed_writers_file_is_sealed_at_its_last_whole_frame(tmp_path):
    path = tmp_path / "killed.rtdc"
    write_run(path, 0, 12)
    with h5py.File(path, "r+") as h5:  # as a kill leaves it: no close, rows of a cut frame
        del h5["logs/shmwriter-run"]
        h5["logs"].create_dataset("shmwriter-run", data=np.array([b"state=RUNNING"]))
        frames = h5["events/frame"][:]
        cut = int(np.searchsorted(frames, 9)) + 1  # frame 9 (3 events) cut after one row
        for name in ("image", "mask", "deform"):
            h5["events"][name].resize(cut, axis=0)
    assert nevents_of(9) == 3
    done = seal_killed_file(str(path), total_frames=12, logs={"a": ["b"]}, reason="lost")
    assert done == max(f for f in range(9) if nevents_of(f)) + 1
    with h5py.File(path) as h5:
        assert set(h5["events/frame"][:]) == {f for f in range(done) if nevents_of(f)}
        log = h5["logs/shmwriter-run"].asstr()[:].tolist()
        assert "state=ABORTED" in log and "reason=lost" in log
        assert f"written_frames={len({f for f in range(done) if nevents_of(f)})}" in log
        assert h5["logs/a"].asstr()[:].tolist() == ["b"]
