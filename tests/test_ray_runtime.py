"""The private local Ray runtime outlives the step thread that started it (tasks/ray_runtime.py)."""

from __future__ import annotations

import threading

from orca_core.recipe import load_recipe
from tasks.ray_runtime import ensure_ray


def test_a_local_runtime_started_from_a_step_thread_outlives_the_thread():
    import ray

    ray.shutdown()  # a runtime another module left behind: this test starts its own
    recipe = load_recipe("smoke", ["ray.num_cpus=1"])
    step = threading.Thread(target=ensure_ray, args=(recipe,))  # as a step in the flow's thread pool does
    step.start()
    step.join()  # the thread is gone, as the pool's threads are at the end of a flow
    try:
        # Ray's processes die with the thread that started them (PR_SET_PDEATHSIG) unless a keeper thread did.
        assert ray.get(ray.remote(lambda: 41 + 1).remote(), timeout=60) == 42
        assert ray.cluster_resources()["CPU"] == 1
    finally:
        ray.shutdown()
