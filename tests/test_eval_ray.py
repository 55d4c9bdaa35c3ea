"""Evaluation on Ray (tasks/eval_ray.py): engines as actors in placement groups, the tokens of the in-process path.

On a private local Ray runtime of 2 CPUs. The vLLM test loads three engines (the child process's and two
on Ray, at once): about 60 s here; the others take seconds.
"""

from __future__ import annotations

import shutil
import time

import pytest

from orca_core.eval.backends import GenerationSettings, chat_prompts, contiguous_shares, generate_jobs, job_file
from orca_core.recipe import load_recipe
from orca_core.steps import plan_key, steps_for
from tasks.eval_ray import RayEngines, engine_bundles, engine_executor, engine_options, shortfall, wait_placed

QUESTIONS = ["What is 3 + 4?", "Spell this word backward: cat", "What is 12 + 30?", "Reverse: stone",
             "Which day comes after Monday?"]
SYSTEMS = {"empty": "", "cautious": "You are a cautious assistant. You carefully follow instructions."}
VLLM = GenerationSettings(backend="vllm", max_new_tokens=24)
HF = GenerationSettings(backend="hf", max_new_tokens=24)


def recipe(*overrides: str):
    return load_recipe("smoke", ["eval.cpus_per_engine=1", "ray.num_cpus=2", *overrides])  # the runtime of 2 CPUs


@pytest.fixture(scope="module")
def ray_runtime():
    """The private local runtime of tasks/ray_runtime.py (2 CPUs); shut down after the module if started here."""
    import ray

    from tasks.ray_runtime import ensure_ray

    started = not ray.is_initialized()
    ensure_ray(recipe())
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def prompts(tiny_checkpoint) -> dict[str, list[list[int]]]:
    """Two jobs of 6 prompts: the questions, and one over the context (no room to answer)."""
    jobs = {}
    for name, system in SYSTEMS.items():
        ids = chat_prompts(tiny_checkpoint, [[{"role": "system", "content": system}, {"role": "user", "content": q}]
                                             for q in QUESTIONS])
        jobs[f"demo.{name}"] = ids + [(ids[0] * 64)[:300]]
    return jobs


def released(ray, cpus: float = 2.0) -> bool:
    """Every placement group removed and the runtime's CPUs free again (Ray frees them moments after a kill)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        groups = ray.util.placement_group_table().values()
        if all(g["state"] == "REMOVED" for g in groups) and ray.available_resources().get("CPU") == cpus:
            return True
        time.sleep(0.2)
    return False


def test_two_vllm_engines_on_ray_give_the_child_process_tokens_and_reuse_its_job_files(
        tiny_checkpoint, prompts, ray_runtime, tmp_path):
    child = generate_jobs(tiny_checkpoint, prompts, tmp_path / "child", VLLM)  # today's backend: vLLM in a child
    engines = RayEngines(recipe("eval.engines=2"))
    seen, stats = [], {}
    on_ray = generate_jobs(tiny_checkpoint, prompts, tmp_path / "ray", VLLM, open_engine=engines,
                           progress=lambda *a: seen.append(a), stats=stats)
    assert on_ray == child
    assert {g.finish_reason for job in on_ray.values() for g in job} >= {"stop", "prompt_too_long"}
    assert len(engines.load_s) == 2 and all(s > 0 for s in engines.load_s)
    assert engines.prompts == [3 + 3, 3 + 3]  # each job's 6 prompts: 3 per engine
    assert sorted(seen) == [("demo.cautious", 6, 6), ("demo.empty", 6, 6)] and stats["prompts"] == 12
    assert all(job_file(tmp_path / "ray", job).is_file() for job in prompts)  # written by the driver
    assert released(ray_runtime)
    # A retried step finds the job files: no engine is placed (this pool could not be: no GPU here).
    stats = {}
    again = generate_jobs(tiny_checkpoint, prompts, tmp_path / "ray", VLLM, stats=stats,
                          open_engine=RayEngines(recipe("eval.use_gpu=true")))
    assert again == child and stats["reused"] == 2 and stats["load_s"] == 0


def test_hf_on_ray_equals_hf_in_process_and_a_broken_checkpoint_is_named(tiny_checkpoint, prompts, ray_runtime,
                                                                          tmp_path):
    here = generate_jobs(tiny_checkpoint, prompts, tmp_path / "here", HF)
    on_ray = generate_jobs(tiny_checkpoint, prompts, tmp_path / "ray", HF, open_engine=RayEngines(recipe()))
    assert on_ray == here
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RuntimeError, match=r"broken-model.*hf on Ray failed.*transformers cannot load it"):
        generate_jobs(broken, prompts, tmp_path / "broken", HF, open_engine=RayEngines(recipe()))
    assert not list((tmp_path / "broken").glob("*.jsonl")) and released(ray_runtime)


def test_engines_the_local_runtime_cannot_hold_fail_at_once_naming_the_settings(tiny_checkpoint, prompts,
                                                                               ray_runtime, tmp_path):
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"no node has \{'GPU': 1.0, 'CPU': 1.0\}.*private local runtime.*"
                                           r"eval.use_gpu"):
        generate_jobs(tiny_checkpoint, prompts, tmp_path, VLLM, open_engine=RayEngines(recipe("eval.use_gpu=true")))
    assert time.monotonic() - started < 10 and released(ray_runtime)
    with pytest.raises(RuntimeError, match=r"3 engines need \{'CPU': 3.0\}, the cluster has \{'CPU': 2.0\}"):
        generate_jobs(tiny_checkpoint, prompts, tmp_path, HF, open_engine=RayEngines(recipe("eval.engines=3")))
    assert released(ray_runtime)


def test_a_cluster_that_cannot_hold_the_engines_gets_the_timeout_to_grow(ray_runtime):
    from ray.util.placement_group import placement_group, remove_placement_group

    cfg = recipe("eval.use_gpu=true", "eval.placement_timeout_s=2").eval
    group = placement_group(engine_bundles(cfg), strategy="STRICT_PACK")
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"none came within eval.placement_timeout_s=2 s"):
            wait_placed([group], engine_bundles(cfg), cfg, local=False)  # as on a cluster with an autoscaler
    finally:
        remove_placement_group(group)
    assert 2 <= time.monotonic() - started < 10


def test_placement_of_tensor_parallel_engines_on_gpus_and_cpus():
    gpu4 = recipe("eval.backend=vllm", "eval.use_gpu=true", "eval.tensor_parallel_size=4",
                  "eval.cpus_per_engine=4").eval
    assert engine_bundles(gpu4) == [{"GPU": 1.0, "CPU": 4.0}, {"GPU": 1.0}, {"GPU": 1.0}, {"GPU": 1.0}]
    assert engine_executor(gpu4) == "ray"  # vLLM's Ray workers take the GPU bundles of the actor's group
    options = engine_options(gpu4, None)
    assert (options["num_cpus"], options["num_gpus"]) == (4.0, 0)
    strategy = options["scheduling_strategy"]
    assert strategy.placement_group_bundle_index == 0 and strategy.placement_group_capture_child_tasks
    gpu1 = recipe("eval.backend=vllm", "eval.use_gpu=true").eval
    assert engine_bundles(gpu1) == [{"GPU": 1.0, "CPU": 1.0}] and engine_executor(gpu1) == "uni"
    assert engine_options(gpu1, None)["num_gpus"] == 1  # TP 1: the actor runs the model on its GPU
    cpu2 = recipe("eval.backend=vllm", "eval.tensor_parallel_size=2").eval
    assert engine_bundles(cpu2) == [{"CPU": 1.0}, {"CPU": 1.0}] and engine_executor(cpu2) == "mp"
    hf = recipe("eval.backend=hf", "eval.tensor_parallel_size=2").eval
    assert engine_bundles(hf) == [{"CPU": 1.0}] and engine_executor(hf) is None


def test_shortfall_reads_node_totals():
    nodes = [{"Alive": True, "Resources": {"CPU": 96.0, "GPU": 8.0}}, {"Alive": True, "Resources": {"CPU": 8.0}},
             {"Alive": False, "Resources": {"CPU": 96.0, "GPU": 8.0}}]
    eight = [{"GPU": 1.0, "CPU": 2.0}] + [{"GPU": 1.0}] * 7
    assert shortfall(eight, 1, nodes) is None
    assert shortfall(eight, 2, nodes) == ("2 engines need {'GPU': 16.0}, "
                                          "the cluster has {'GPU': 8.0, 'CPU': 104.0} in all")
    assert shortfall(eight + [{"GPU": 1.0}], 1, nodes).startswith("no node has {'GPU': 9.0, 'CPU': 2.0}")


def test_contiguous_shares_keep_prompt_order():
    assert contiguous_shares(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert contiguous_shares([0, 1], 3) == [[0], [1], []]
    assert [x for share in contiguous_shares(list(range(512)), 8) for x in share] == list(range(512))


def test_where_the_engines_run_is_in_no_step_key(tmp_path):
    store = f"store.root={tmp_path}"
    key = lambda *o: plan_key(steps_for(recipe(store, *o))["eval-base"], recipe(store, *o))  # noqa: E731
    base = key()
    assert key("eval.engines=4", "eval.use_gpu=true", "eval.cpus_per_engine=8", "eval.placement_timeout_s=60") == base
    assert key("eval.tensor_parallel_size=2") != base  # TP may change a GPU's sums: it is a generation setting
