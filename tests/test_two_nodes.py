"""The runtime on an existing two-node Ray cluster (``ray.cluster_utils.Cluster``): the rollout worker
and the learner land on different nodes and the run completes through ``cluster.address``."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster

from aurora_rl.config import ClusterSection
from tests.test_ray_runtime import tiny_config


@pytest.mark.smoke
def test_run_on_two_node_cluster(tmp_path):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        from aurora_rl.runtime.driver import prepare, start_actors

        cfg = tiny_config(tmp_path, cluster=ClusterSection(address=cluster.address), max_requests=12)
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        traffic, draft, head, _ = prepare(cfg)
        actors = start_actors(cfg, draft, head, tmp_path)
        worker_node = ray.get(actors["workers"][0].node_id.remote())
        learner_node = ray.get(actors["learner"].info.remote())["node_id"]
        assert worker_node != learner_node  # one CPU per node: they cannot share one
        from aurora_rl.runtime.driver import run, stop_actors

        stop_actors(actors)

        s = run(cfg)
        assert s["counters"]["answered"] == 12 and s["final_policy_version"] >= 1
    finally:
        ray.shutdown()
        cluster.shutdown()
