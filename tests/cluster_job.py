"""A batch run on a multi-node Ray cluster on this machine, losing a worker node mid-run.

Run by tests/test_cluster.py in its own process (a driver joins one Ray cluster at a time):

    python tests/cluster_job.py MANIFEST OUTPUT RUN_ID {replace|shrink|nogpu} STEPS TRAIN_STORAGE SUMMARY_JSON

The cluster: a head without CPUs for work (the driver, the Train controller and the run's work
queue live there) and two worker nodes of 1 CPU. When the first residual lands, one worker node
is removed (its processes are killed, as when a machine is lost). ``replace`` then adds a new node
(a fixed group of 2 restarts on it); ``shrink`` adds none (an elastic group of 1..2 goes on with one
worker). ``nogpu`` asks for a GPU per worker on this CPU-only cluster, which the driver joined (so an
autoscaler could still add GPU nodes): the run waits --resources-timeout (5 s), then ends naming what
is missing. Writes the run's summary to SUMMARY_JSON.
"""

import json
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster

from catversion import layout, storage
from pipelines.batch import BatchConfig, run_batch


def main() -> None:
    manifest, output, run_id, mode = sys.argv[1:5]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 80 * 1024**2, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
    })
    nodes = [cluster.add_node(num_cpus=1, object_store_memory=80 * 1024**2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    config = BatchConfig(manifest=manifest, output=output, model="tiny", workers=2,
                         min_workers=1 if mode == "shrink" else None, pack=2, steps=int(sys.argv[5]), state_every=5,
                         max_failures=4, run_id=run_id, resources_timeout_s=5 if mode == "nogpu" else 120,
                         gpus_per_worker=1 if mode == "nogpu" else 0, resize_interval_s=5,
                         storage_path=sys.argv[6])
    outcome: dict = {}
    lines: list[str] = []
    thread = threading.Thread(target=lambda: outcome.update(summary=run_batch(config, log=lines.append)))
    thread.start()
    deadline = time.monotonic() + 240
    while mode != "nogpu" and thread.is_alive() and not storage.list_uris(layout.residuals_folder(output)):
        if time.monotonic() > deadline:
            raise SystemExit("no residual appeared")
        time.sleep(0.2)
    events = []
    if mode != "nogpu" and thread.is_alive():
        cluster.remove_node(nodes[0], allow_graceful=False)
        events.append("removed a worker node")
        if mode == "replace":
            time.sleep(2)
            cluster.add_node(num_cpus=1, object_store_memory=80 * 1024**2)
            events.append("added a replacement node")
    thread.join()
    summary = outcome["summary"]
    with open(sys.argv[7], "w") as handle:
        json.dump({"events": events, "error": summary.error, "counts": summary.counts,
                   "statuses": {r["concept_id"]: r["status"] for r in summary.results},
                   "errors": {r["concept_id"]: r["error"] for r in summary.results if r["error"]},
                   "log": lines[-20:]}, handle)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
