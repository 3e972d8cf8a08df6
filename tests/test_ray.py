"""RayWriter on a simulated two-node cluster: node-local writers, one merged file."""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys

import h5py
import psutil
import pytest
import ray
from _ray_workers import Gate, put_block, put_foreign_frame
from _workers import SCHEMA, events_of
from ray.cluster_utils import Cluster
from test_merge import LOGS, METADATA, assert_same_file, check_report, write_run

import shmwriter
from shmwriter.ray import RayWriter, _finish_writer_process

#: Each simulated node: one CPU, a small object store (the rings need /dev/shm too).
NODE = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
OPTIONS = {"write_threshold": 7, "metadata": METADATA, "logs": LOGS, "flush_interval_s": 0.2}


@pytest.fixture(scope="module")
def cluster():
    """A head and one more node on this machine, on 127.0.0.1 only (conftest sets
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before ray is imported)."""
    saved = os.environ.get("PYTHONPATH")
    tests = str(pathlib.Path(__file__).parent)  # the workers import _ray_workers
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, saved]))
    simulated = Cluster(initialize_head=True,
                        head_node_args={**NODE, "include_dashboard": False})
    try:
        simulated.add_node(**NODE)
        ray.init(address=simulated.address, log_to_driver=False)
        simulated.wait_for_nodes()
        yield simulated
    finally:
        ray.shutdown()
        simulated.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def run_segments():
    return {name for name in os.listdir("/dev/shm") if name.startswith("shmw_")}


@pytest.fixture
def no_segments_left(cluster):
    before = run_segments()
    yield
    assert run_segments() - before == set()


def alive_nodes():
    return [node["NodeID"] for node in ray.nodes() if node["Alive"]]


def frames_in(path):
    with h5py.File(path) as h5:
        return set(h5["events/frame"][:].tolist())


def assert_every_frame_written_or_missing(path, total, missing):
    """Each frame with events is in the file or missing, never both."""
    with_events = {f for f in range(total) if events_of(f) is not None}
    written = frames_in(path)
    assert written == with_events - set(missing)


def test_the_cluster_listens_on_loopback_only(cluster):
    """Every socket the cluster's processes (this one's descendants) listen on is bound to
    127.0.0.1: tests talk to nothing else."""
    processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
    listening = set()
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            listening |= {(process.name(), c.laddr.ip) for c in process.net_connections("tcp")
                          if c.status == psutil.CONN_LISTEN}
    assert len({name for name, _ in listening}) >= 3  # gcs_server, raylets, workers...
    assert {ip for _, ip in listening} <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening


def test_a_run_on_two_nodes_merges_into_the_file_of_one_writer(tmp_path, no_segments_left):
    skip = {3, 27, 94}
    write_run(tmp_path / "whole.rtdc", 0, 95, missing=skip)
    with RayWriter(tmp_path / "run.rtdc", SCHEMA, total_frames=95, frames_per_block=10,
                   allow_gaps=True, **OPTIONS) as writer:
        assert len(writer.nodes) == 2
        ran_on = ray.get([put_block.options(**writer.placement(block)).remote(writer, block,
                                                                              skip)
                          for block in writer.blocks()])
    assert ran_on == [writer.node_of(block) for block in writer.blocks()]
    assert ran_on[:2] == list(writer.nodes) and ran_on[2] == writer.nodes[0]
    assert writer.missing_frames == sorted(skip)
    assert [(p.node_id, p.frames) for p in writer.parts] == [(writer.nodes[0], 50),
                                                               (writer.nodes[1], 45)]
    assert sum(p.events for p in writer.parts) == len(h5py.File(tmp_path / "run.rtdc")
                                                      ["events/frame"])
    assert_same_file(tmp_path / "run.rtdc", tmp_path / "whole.rtdc")
    assert check_report(tmp_path / "run.rtdc") == check_report(tmp_path / "whole.rtdc")
    assert not os.path.exists(writer.parts_dir)  # parts removed, their folder too


def test_a_frame_of_another_nodes_block_is_refused_naming_that_node(tmp_path,
                                                                    no_segments_left):
    with RayWriter(tmp_path / "run.rtdc", SCHEMA, total_frames=20, frames_per_block=10,
                   keep_parts=True, **OPTIONS) as writer:
        blocks = list(writer.blocks())
        error, frame, bad_events, bad_frame = ray.get(put_foreign_frame.options(
            **writer.placement(blocks[0])).remote(writer, blocks[0], 15))
        ray.get(put_block.options(**writer.placement(blocks[1])).remote(writer, blocks[1]))
    assert frame == 15 and f"node {writer.nodes[1]} writes" in error
    assert bad_frame == 0 and "run frame 0" in bad_events and "'bad'" in bad_events
    assert frames_in(tmp_path / "run.rtdc") == {f for f in range(20) if events_of(f)}
    assert all(os.path.exists(p.path) for p in writer.parts)


def test_a_task_placed_on_no_writers_node_cannot_attach(tmp_path, no_segments_left):
    head = alive_nodes()[0]
    with RayWriter(tmp_path / "run.rtdc", SCHEMA, total_frames=10, frames_per_block=10,
                   nodes=[head], **OPTIONS) as writer:
        other = next(node for node in alive_nodes() if node != head)
        with pytest.raises(ray.exceptions.RayTaskError, match="no writer of this run runs"):
            ray.get(put_block.options(scheduling_strategy=ray.util.scheduling_strategies
                                      .NodeAffinitySchedulingStrategy(other, soft=False))
                    .remote(writer, range(10)))
        ray.get(put_block.options(**writer.placement(0)).remote(writer, range(10)))
    assert writer.parts[0].frames == 10


def test_a_task_killed_mid_block_leaves_its_frames_not_put_missing(tmp_path,
                                                                   no_segments_left):
    writer = RayWriter(tmp_path / "run.rtdc", SCHEMA, total_frames=40, frames_per_block=10,
                       **OPTIONS)
    with pytest.raises(shmwriter.MissingFramesError) as error:
        with writer:
            refs = [put_block.options(**writer.placement(block)).remote(
                writer, block, stop_after=4 if block.start == 10 else None, how="kill")
                    for block in writer.blocks()]
            with pytest.raises(ray.exceptions.WorkerCrashedError):
                ray.get(refs[1])
            ray.get([refs[0], *refs[2:]])
    assert list(error.value.missing_frames) == list(range(14, 20))
    assert writer.missing_frames == list(range(14, 20))
    assert_every_frame_written_or_missing(tmp_path / "run.rtdc", 40, range(14, 20))


@pytest.mark.parametrize("fault", ["writer actor killed", "node lost"])
def test_a_lost_writer_leaves_its_part_up_to_its_last_flush(tmp_path, cluster, fault,
                                                           no_segments_left):
    head = alive_nodes()[0]
    extra = cluster.add_node(**NODE) if fault == "node lost" else None
    cluster.wait_for_nodes()
    other = next(node for node in alive_nodes() if node != head) if extra is None else \
        extra.node_id
    gate = Gate.options(scheduling_strategy=ray.util.scheduling_strategies
                        .NodeAffinitySchedulingStrategy(head, soft=False)).remote()
    with RayWriter(tmp_path / "run.rtdc", SCHEMA, total_frames=40, frames_per_block=10,
                   nodes=[head, other], allow_gaps=True, **OPTIONS) as writer:
        blocks = list(writer.blocks())
        lost = [put_block.options(**writer.placement(1)).remote(writer, blocks[1], gate=gate,
                                                                stop_after=5)]
        kept = [put_block.options(**writer.placement(b)).remote(writer, blocks[b])
                for b in (0, 2)]
        ray.get(gate.wait_for.remote(1))
        if extra is not None:
            cluster.remove_node(extra)
        else:
            ray.kill(writer._actors[1])  # the driver's handle on node 1's writer actor
            gate.open.remote()  # the task goes on putting, into a run that is gone
        ray.get(kept)
        ray.wait(lost, timeout=60)  # it ends: with its node, or by a put into a gone run
    lost_part = writer.parts[1]
    assert lost_part.missing_frames[-10:] == list(range(30, 40))  # block 3: never put
    assert set(range(15, 20)) <= set(lost_part.missing_frames)
    assert set(lost_part.missing_frames) <= set(range(10, 20)) | set(range(30, 40))
    assert writer.missing_frames == lost_part.missing_frames
    assert_every_frame_written_or_missing(tmp_path / "run.rtdc", 40, writer.missing_frames)
    with h5py.File(tmp_path / "run.rtdc") as h5:
        run_log = h5["logs/shmwriter-run"].asstr()[:].tolist()
    assert "state=ABORTED" in run_log and any("was lost" in line for line in run_log)
    write_run(tmp_path / "whole.rtdc", 0, 40)  # dclab finds in it what it finds in ours
    assert check_report(tmp_path / "run.rtdc")[0] == check_report(tmp_path / "whole.rtdc")[0]


def test_a_node_whose_close_fails_leaves_no_other_node_open(tmp_path, no_segments_left):
    head = alive_nodes()[0]
    gate = Gate.options(scheduling_strategy=ray.util.scheduling_strategies
                        .NodeAffinitySchedulingStrategy(head, soft=False)).remote()
    writer = RayWriter(tmp_path / "run.rtdc", SCHEMA, total_frames=20, frames_per_block=10,
                       allow_gaps=True, **OPTIONS)
    first, second = writer.blocks()
    stalled = put_block.options(**writer.placement(second)).remote(writer, second, gate=gate,
                                                                   stop_after=3)
    ray.get(put_block.options(**writer.placement(first)).remote(writer, first))
    ray.get(gate.wait_for.remote(1))  # node 1's producer holds its run open
    with pytest.raises(TimeoutError, match="did not end within 2"):
        writer.close(timeout_s=2)
    gate.open.remote()
    ray.wait([stalled], timeout=60)
    assert frames_in(tmp_path / "run.rtdc") >= {f for f in range(10) if events_of(f)}
    assert set(range(13, 20)) <= set(writer.parts[1].missing_frames)
    assert not os.path.exists(writer.parts_dir)


def test_a_lost_writers_pid_taken_by_another_process_is_left_alone():
    """The pid of a lost node's Writer process may be reused by the time close() looks:
    the start time tells, and that process is neither waited for nor killed."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = psutil.Process(other.pid).create_time()
        _finish_writer_process((other.pid, started - 100.0), "shmw_1_no_such_ring")
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_a_node_whose_writer_cannot_start_ends_the_started_ones(tmp_path, no_segments_left):
    """Node 1's Writer cannot create its part (a folder has its name): RayWriter raises
    naming that node, and node 0's started Writer is ended, its ring and part removed."""
    blocker = tmp_path / "run.rtdc.parts" / "run.part1.rtdc"
    blocker.mkdir(parents=True)
    with pytest.raises(RuntimeError, match=r"the writer of node \w+ \(part 1\) could not "
                                           r"start: .*run.part1.rtdc"):
        RayWriter(tmp_path / "run.rtdc", SCHEMA, total_frames=20, frames_per_block=10,
                  **OPTIONS)
    assert os.listdir(blocker.parent) == ["run.part1.rtdc"]  # node 0's part is gone
    assert not (tmp_path / "run.rtdc").exists()
