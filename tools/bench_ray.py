"""RayWriter on simulated Ray clusters of 1 and 2 nodes: events/s per node, and the merge's MB/s.

One machine cannot show scaling across nodes: its cores are shared by every
simulated node. What it can show is each node's rate and what the merge
costs, the two figures of the model in the README ("Past one machine"):
N nodes write at N x the per-node rate, then one merge at its MB/s.

Each run: a fresh cluster of ``nodes`` nodes (1 CPU, 80 MB object store each,
on 127.0.0.1), a RayWriter over them, one task per block of frames putting
the bench's real events (dcnum's test data next to this checkout, else
synthetic) with ``put_many`` in batches of 100 frames. Timed: from the
tasks' submission to the end of ``close()`` less the merge (the write), and
the merge alone (``RayWriter.merge_s``). Medians of ``--repeat`` runs.

    python tools/bench_ray.py [--frames 6000] [--frames-per-block 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

CHECKOUT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dcnum-testdata"
NODE = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
FILTERS = {"uncompressed + fletcher32": {"compression": None},
           "Zstd-5 + fletcher32": None}
BATCH_FRAMES = 100


def put_block(writer, block, data_dir):
    """Put ``block``'s frames with put_many; return (events, event bytes)."""
    from shmwriter.bench._work import _batch_events, load_workload

    workload = load_workload(data_dir)
    events = nbytes = 0
    with writer.producer() as producer:
        for at in range(block.start, block.stop, BATCH_FRAMES):
            frames = list(range(at, min(at + BATCH_FRAMES, block.stop)))
            counts, arrays = _batch_events(workload, frames)
            producer.put_many(frames, counts, arrays)
            events += sum(counts)
            nbytes += sum(a.nbytes for a in arrays.values()) if arrays else 0
    return events, nbytes


def one_run(nodes, frames, frames_per_block, kwargs, data_dir, folder):
    import ray
    from ray.cluster_utils import Cluster

    from shmwriter.bench._work import BENCH_SCHEMA
    from shmwriter.ray import RayWriter

    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(**NODE)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        task = ray.remote(num_cpus=1, max_retries=0)(put_block)
        with RayWriter(os.path.join(folder, "run.rtdc"), BENCH_SCHEMA, total_frames=frames,
                       frames_per_block=frames_per_block, hdf5_dataset_kwargs=kwargs,
                       index_feature="frame") as writer:
            started = time.perf_counter()
            done = ray.get([task.options(**writer.placement(block)).remote(writer, block,
                                                                           data_dir)
                            for block in writer.blocks()])
        total_s = time.perf_counter() - started
        events, nbytes = map(sum, zip(*done, strict=True))
        return {"events": events, "nbytes": nbytes, "write_s": total_s - writer.merge_s,
                "merge_s": writer.merge_s}
    finally:
        ray.shutdown()
        cluster.shutdown()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=6000)
    parser.add_argument("--frames-per-block", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--data", default=str(CHECKOUT_DATA) if CHECKOUT_DATA.is_dir() else None)
    args = parser.parse_args(argv)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node on 127.0.0.1
    print(f"RayWriter bench: {args.frames} frames, blocks of {args.frames_per_block}, "
          f"put_many of {BATCH_FRAMES}, {os.cpu_count()} CPUs, medians of {args.repeat}; "
          f"events from {args.data or 'synthetic'}")
    print("| filters | nodes | events | MB | write s | events/s | events/s per node "
          "| merge s | merge MB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, kwargs in FILTERS.items():
        for nodes in (1, 2):
            runs = []
            for _ in range(args.repeat):
                with tempfile.TemporaryDirectory(dir=os.getcwd(), prefix=".bench-ray-") as folder:
                    runs.append(one_run(nodes, args.frames, args.frames_per_block, kwargs,
                                        args.data, folder))
            write_s = statistics.median(r["write_s"] for r in runs)
            merge_s = statistics.median(r["merge_s"] for r in runs)
            events, mb = runs[0]["events"], runs[0]["nbytes"] / 1e6
            print(f"| {label} | {nodes} | {events:,} | {mb:,.1f} | {write_s:.2f} "
                  f"| {events / write_s:,.0f} | {events / write_s / nodes:,.0f} "
                  f"| {merge_s:.2f} | {mb / merge_s:,.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
