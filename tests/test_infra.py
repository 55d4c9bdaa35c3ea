"""Deploy-time files (infra/, .dockerignore): they parse, agree with each other, with
pyproject.toml, with the installed Ray and Prefect, and with the production recipe.

Nothing here needs Docker, Kubernetes or a cloud: the Ray launcher config goes through
Ray's own validator, the Prefect work-pool template through Prefect's own server-side
check and templating, and everything else through structural assertions. Each check
has a broken twin that must fail, so a test that cannot fail shows up as a failure.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from orca_core.recipe import load_recipe
from tasks.ray_runtime import LOCAL_PINNING_AMOUNT, ensure_ray, fanout_actor_options

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
RAYCLUSTER = INFRA / "ray/kuberay-raycluster.yaml"
LAUNCHER = INFRA / "ray/cluster-launcher.yaml"
COMPOSE = INFRA / "prefect/docker-compose.yaml"
JOB_TEMPLATE = INFRA / "prefect/k8s-work-pool-job-template.json"
DOCKERFILE = INFRA / "docker/Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

STORE_MOUNT = "/data/orca"  # where every node, worker and flow-run pod sees the artifact store
IMAGE = re.compile(r"^(?:.+/)?orca-pipeline:(?P<project>\d[\w.]*)-ray(?P<ray>\d+\.\d+\.\d+)$")
PLACEHOLDER = re.compile(r"\{\{\s*([\w.\-\[\]$]+)\s*\}\}")  # Prefect's own placeholder syntax
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned(package: str) -> str:
    """The exact version pyproject.toml pins for a dependency (`name==X`)."""
    for requirement in PYPROJECT["project"]["dependencies"]:
        if (m := re.fullmatch(rf"{re.escape(package)}(?:\[[^]]*\])?==([\w.]+)", requirement.replace(" ", ""))):
            return m.group(1)
    raise AssertionError(f"pyproject.toml does not pin {package} exactly")


def docker_arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert m, f"{DOCKERFILE.name}: no `ARG {name}=...` default"
    return m.group(1)


@pytest.fixture(scope="module")
def cluster_docs() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(RAYCLUSTER.read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert sorted(kinds) == ["NetworkPolicy", "NetworkPolicy", "PersistentVolumeClaim", "RayCluster"], kinds
    return {d["kind"]: d for d in docs if d["kind"] != "NetworkPolicy"}


@pytest.fixture(scope="module")
def network_policies() -> list[dict]:
    return [d for d in yaml.safe_load_all(RAYCLUSTER.read_text()) if d and d["kind"] == "NetworkPolicy"]


@pytest.fixture(scope="module")
def raycluster(cluster_docs) -> dict:
    return cluster_docs["RayCluster"]


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def template() -> dict:
    return json.loads(JOB_TEMPLATE.read_text())


@pytest.fixture(scope="module")
def production():
    return load_recipe("orca2-7b")


def groups(raycluster: dict) -> list[tuple[str, dict]]:
    """(name, group spec) for the head and every worker group."""
    spec = raycluster["spec"]
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def gpu_groups(raycluster: dict) -> list[dict]:
    return [g for _, g in groups(raycluster)[1:]
            if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in g["template"]["spec"]["containers"])]


def rendered_job(template: dict, **values: Any) -> dict:
    """The work pool's job configuration with the variables' defaults (and `values`) applied, as Prefect does."""
    from prefect.utilities.templating import apply_values

    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if v.get("default") is not None}
    return apply_values(copy.deepcopy(template["job_configuration"]), {**defaults, "name": "orca-run", **values})


# -- every file -----------------------------------------------------------------------------
def test_every_infra_file_parses_and_the_expected_ones_exist():
    expected = {RAYCLUSTER, LAUNCHER, COMPOSE, JOB_TEMPLATE, DOCKERFILE, DOCKERIGNORE, INFRA / "README.md"}
    assert not (missing := [str(p.relative_to(REPO)) for p in expected if not p.is_file()]), missing
    parsed = 0
    for path in sorted(INFRA.rglob("*")):
        if path.suffix in (".yaml", ".yml"):
            assert [d for d in yaml.safe_load_all(path.read_text()) if d], f"{path}: empty"
            parsed += 1
        elif path.suffix == ".json":
            assert isinstance(json.loads(path.read_text()), dict), path
            parsed += 1
    assert parsed >= 7  # 4 DeepSpeed JSONs, 2 Ray YAMLs, the compose file, the work-pool template


def test_one_image_everywhere_with_the_installed_ray_and_the_project_version(raycluster, launcher, compose, template):
    images = {f"raycluster/{name}/{c['name']}": c["image"]
              for name, g in groups(raycluster) for c in g["template"]["spec"]["containers"]}
    images |= {f"launcher/docker.{k}": v for k, v in launcher["docker"].items() if k in ("image", "head_image", "worker_image")}
    images |= {f"launcher/{t}": nt["docker"]["worker_image"] for t, nt in launcher["available_node_types"].items()
               if "worker_image" in nt.get("docker", {})}
    images["compose/prefect-worker"] = compose["services"]["prefect-worker"]["image"]
    images["k8s-template/image"] = template["variables"]["properties"]["image"]["default"]
    assert len(set(images.values())) == 1, images
    m = IMAGE.match(next(iter(images.values())))
    assert m, f"image {next(iter(images.values()))!r} is not orca-pipeline:<project version>-ray<ray version>"
    installed_ray = importlib.metadata.version("ray")
    assert m["ray"] == installed_ray == raycluster["spec"]["rayVersion"] == docker_arg("RAY_VERSION")
    assert m["project"] == PYPROJECT["project"]["version"]
    # The Dockerfile's build instructions name the same tag.
    assert f"-t {m.group(0)} " in DOCKERFILE.read_text()


def test_prefect_version_is_the_pinned_one_everywhere(compose):
    version = pinned("prefect")
    assert importlib.metadata.version("prefect") == version
    assert docker_arg("PREFECT_VERSION") == version
    server_image = compose["services"]["prefect-server"]["image"]
    assert server_image == f"prefecthq/prefect:{version}-python3.11", server_image


# -- KubeRay RayCluster ---------------------------------------------------------------------
def test_raycluster_head_takes_no_work_and_start_params_are_strings(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    head = raycluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # never a public LoadBalancer by default
    for name, group in groups(raycluster):
        params = group.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in params.values()), f"{name}: KubeRay wants string rayStartParams: {params}"
        for container in group["template"]["spec"]["containers"]:
            res = container["resources"]
            assert res.get("requests") and res.get("limits"), f"{name}: requests and limits"
            assert "cpu" in res["limits"] and "memory" in res["limits"], name
    head_limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits


def test_raycluster_gpu_worker_group_fits_the_production_recipe(raycluster, production):
    gpu = gpu_groups(raycluster)
    assert gpu, "a worker group with nvidia.com/gpu limits"
    for group in gpu:
        container = group["template"]["spec"]["containers"][0]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert int(limits["nvidia.com/gpu"]) == 1, "one GPU per pod (one Ray Train worker each)"
        assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        if "num-gpus" in group["rayStartParams"]:
            assert int(group["rayStartParams"]["num-gpus"]) == int(limits["nvidia.com/gpu"])
        # One Ray Train worker (train.cpus_per_worker CPUs + 1 GPU) must fit a pod.
        assert float(limits["cpu"]) >= production.train.cpus_per_worker
    assert production.train.use_gpu
    capacity = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
                   for g in gpu)
    assert capacity >= production.train.workers, f"{capacity} GPUs at most, train.workers={production.train.workers}"
    assert raycluster["spec"].get("enableInTreeAutoscaling") is True


def test_rays_kuberay_autoscaler_reads_the_cluster_as_intended(raycluster, production):
    """The autoscaler sidecar turns the RayCluster into node types: Ray's own conversion, then Ray's validator."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    from ray.autoscaler._private.util import validate_config

    cr = copy.deepcopy(raycluster)
    cr["metadata"]["namespace"] = "orca"  # set by `kubectl -n orca apply`
    config = _derive_autoscaling_config_from_ray_cr(cr)
    validate_config(config)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0
    gpu = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert set(gpu) == {g["groupName"] for g in gpu_groups(raycluster)}
    assert all(t["resources"]["CPU"] >= production.train.cpus_per_worker for t in gpu.values())
    assert sum(t["max_workers"] * t["resources"]["GPU"] for t in gpu.values()) >= production.train.workers
    assert not any(t["resources"].get("GPU") for name, t in types.items() if name not in gpu)


def test_store_volume_is_the_same_claim_at_the_same_path_everywhere(cluster_docs, raycluster, launcher, compose, template, production):
    pvc = cluster_docs["PersistentVolumeClaim"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "many pods write the store at once"
    claim = pvc["metadata"]["name"]
    for name, group in groups(raycluster):
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            mounts = [m for m in container["volumeMounts"] if m["mountPath"] == STORE_MOUNT]
            assert len(mounts) == 1, f"{name}/{container['name']}: store not mounted at {STORE_MOUNT}"
            assert volumes[mounts[0]["name"]]["persistentVolumeClaim"]["claimName"] == claim, name
            assert "/dev/shm" in [m["mountPath"] for m in container["volumeMounts"]], f"{name}: Ray needs a real /dev/shm"
        assert pod["securityContext"]["fsGroup"] == 1000, f"{name}: the image's user must be able to write the store"
    # The Prefect flow-run pods mount the same claim at the same path.
    job = rendered_job(template)
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == STORE_MOUNT)
    assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim
    # The launcher's containers and the compose worker see the store at the same path.
    assert f"-v {STORE_MOUNT}:{STORE_MOUNT}" in launcher["docker"]["run_options"]
    assert any(v.endswith(f":{STORE_MOUNT}") for v in compose["services"]["prefect-worker"]["volumes"])
    # The production recipe reads its benchmark copies from that volume.
    assert production.eval.data_dir.startswith(STORE_MOUNT + "/")


# -- secure cluster defaults: token auth, NetworkPolicies, teacher keys only where teachers are called ---------
RAY_AUTH_SECRET = {"name": "orca-ray-auth", "key": "auth_token"}


def ray_containers(raycluster: dict) -> dict[str, dict]:
    """Every container of the cluster that talks to its GCS: each group's, and the autoscaler sidecar."""
    containers = {f"{name}/{c['name']}": c for name, g in groups(raycluster) for c in g["template"]["spec"]["containers"]}
    if raycluster["spec"].get("enableInTreeAutoscaling"):
        containers["head/autoscaler"] = raycluster["spec"].get("autoscalerOptions", {})
    return containers


def flow_container(template: dict) -> dict:
    return rendered_job(template)["job_manifest"]["spec"]["template"]["spec"]["containers"][0]


def without_token_auth(containers: dict[str, dict]) -> list[str]:
    """The containers that would run Ray without the cluster's token: mode not `token`, or the token not from its Secret."""
    bad = []
    for name, container in containers.items():
        env = {e["name"]: e for e in container.get("env", [])}
        ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
        if env.get("RAY_AUTH_MODE", {}).get("value") != "token" or {k: ref.get(k) for k in RAY_AUTH_SECRET} != RAY_AUTH_SECRET:
            bad.append(name)
    return bad


def test_every_ray_container_and_the_flow_pod_run_with_the_clusters_token(raycluster, template):
    containers = ray_containers(raycluster)
    assert {"head/ray-head", "cpu/ray-worker", "gpu/ray-worker", "head/autoscaler"} <= set(containers)
    assert without_token_auth(containers) == []
    # On the cluster the Secret is required: without it a pod does not start, rather than run Ray without auth.
    token_refs = [e["valueFrom"]["secretKeyRef"] for c in containers.values() for e in c["env"] if e["name"] == "RAY_AUTH_TOKEN"]
    assert len(token_refs) == len(containers) and not any(r.get("optional") for r in token_refs)
    # The flow-run pod (a driver joining through ray://) holds the same Secret's token.
    assert without_token_auth({"flow-run": flow_container(template)}) == []
    # The broken twin: a worker group without it is caught.
    broken = copy.deepcopy(raycluster)
    gpu = next(g for g in broken["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")["template"]["spec"]["containers"][0]
    gpu["env"] = [e for e in gpu["env"] if not e["name"].startswith("RAY_AUTH")]
    assert without_token_auth(ray_containers(broken)) == ["gpu/ray-worker"]


def pod_labels(raycluster: dict, template: dict) -> dict[str, dict[str, str]]:
    """The labels of each kind of pod in the namespace: the Ray pods by group, the flow-run pods, any other pod."""
    pods = {name: g["template"]["metadata"]["labels"] for name, g in groups(raycluster)}
    pods["flow-run"] = rendered_job(template)["job_manifest"]["spec"]["template"]["metadata"]["labels"]
    pods["other"] = {"app.kubernetes.io/name": "prefect-worker"}
    return pods


def selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are evaluated here: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def allowed_ingress(policies: list[dict], pods: dict[str, dict[str, str]]) -> dict[str, dict[str, frozenset | None]]:
    """Kubernetes NetworkPolicy semantics within one namespace: for each pod an ingress policy selects, the peers
    let in and their ports (None: every port). "*" is any source beyond these pods: another namespace, an IP
    block, or a rule without `from`. A pod no ingress policy selects is open to all and does not appear."""
    allowed: dict[str, dict[str, frozenset | None]] = {}
    for policy in policies:
        spec = policy["spec"]
        if "Ingress" not in spec.get("policyTypes", ["Ingress"]):
            continue
        for target in (name for name, labels in pods.items() if selects(spec["podSelector"], labels)):
            peers = allowed.setdefault(target, {})
            for rule in spec.get("ingress", []):
                ports = frozenset(p["port"] for p in rule["ports"]) if rule.get("ports") else None
                sources = {"*", *pods} if not rule.get("from") else set()
                for peer in rule.get("from", []):
                    if "ipBlock" in peer or "namespaceSelector" in peer:
                        sources.add("*")
                    else:
                        sources |= {name for name, labels in pods.items() if selects(peer["podSelector"], labels)}
                for source in sources:
                    before = peers.get(source, frozenset())
                    peers[source] = None if before is None or ports is None else before | ports
    return allowed


def test_network_policies_keep_rays_ports_inside_the_cluster_and_the_flow_pods(network_policies, raycluster, template):
    pods = pod_labels(raycluster, template)
    ray_pods = {name for name, _ in groups(raycluster)}
    for policy in network_policies:
        selected = {name for name, labels in pods.items() if selects(policy["spec"]["podSelector"], labels)}
        assert selected and selected <= ray_pods, (policy["metadata"]["name"], selected)
    inside = dict.fromkeys(ray_pods)  # every Ray pod, every port
    client_and_dashboard = frozenset({10001, 8265})  # never the GCS (6379) or a worker from outside the cluster
    assert allowed_ingress(network_policies, pods) == {
        "head": inside | {"flow-run": client_and_dashboard}, "cpu": inside, "gpu": inside}
    # Broken twins: a rule without `from`, the GCS opened to the flow pods, a Ray pod no policy selects.
    open_rule = copy.deepcopy(network_policies)
    open_rule[0]["spec"]["ingress"].append({"ports": [{"port": 8265}]})
    assert allowed_ingress(open_rule, pods)["gpu"]["*"] == frozenset({8265})
    gcs = copy.deepcopy(network_policies)
    gcs[1]["spec"]["ingress"][0]["ports"].append({"port": 6379, "protocol": "TCP"})
    assert allowed_ingress(gcs, pods)["head"]["flow-run"] == client_and_dashboard | {6379}
    unlabelled = copy.deepcopy(raycluster)
    unlabelled["spec"]["workerGroupSpecs"][1]["template"]["metadata"]["labels"].pop("app.kubernetes.io/part-of")
    assert "gpu" not in allowed_ingress(network_policies, pod_labels(unlabelled, template))


def teacher_key_holders(containers: dict[str, dict], key_names: set[str], secret: str) -> set[str]:
    """The containers whose environment holds a teacher key: the variable by name, or anything from the keys' Secret."""
    holders = set()
    for name, container in containers.items():
        env = container.get("env", [])
        secrets_used = {e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") for e in env}
        secrets_used |= {source.get("secretRef", {}).get("name") for source in container.get("envFrom", [])}
        if {e["name"] for e in env} & key_names or secret in secrets_used:
            holders.add(name)
    return holders


def test_teacher_keys_reach_only_the_pods_that_call_teachers(raycluster, template, production):
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    keys = {e.api_key_env for e in (production.teachers.assistant, production.teachers.strong)}
    secret = template["variables"]["properties"]["teacher_keys_secret"]["default"]
    containers = ray_containers(raycluster) | {"flow-run/prefect-job": flow_container(template)}
    # The fan-out actors (cpu group) and the driver (Batch API mode): not the head, not the GPU trainers.
    assert teacher_key_holders(containers, keys, secret) == {"cpu/ray-worker", "flow-run/prefect-job"}
    # The actors run only where the keys are: Ray's own reading of the cluster gives the production
    # recipe's actor resources to exactly those node types, and the actors ask for them.
    assert production.ray.actor_resources
    assert fanout_actor_options(production)["resources"] == production.ray.actor_resources
    cr = copy.deepcopy(raycluster)
    cr["metadata"]["namespace"] = "orca"
    types = _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]
    hosts = {name for name, t in types.items()
             if all(t["resources"].get(r, 0) >= amount for r, amount in production.ray.actor_resources.items())}
    assert hosts == {"cpu"}
    # The broken twin: the keys' Secret on the GPU group is caught.
    broken = copy.deepcopy(raycluster)
    next(g for g in broken["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")["template"]["spec"]["containers"][0][
        "envFrom"].append({"secretRef": {"name": secret, "optional": True}})
    assert "gpu/ray-worker" in teacher_key_holders(ray_containers(broken), keys, secret)


def env_file_variables(commands: list[str]) -> set[str]:
    """The variables a node's initialization commands write into the env file that `docker run --env-file` reads."""
    names: set[str] = set()
    for command in commands:
        if "orca-keys.env" in command and (m := re.search(r"for name in ([\w ]+); do", command)):
            names |= set(m.group(1).split())
    return names


def test_launcher_nodes_run_with_the_token_and_keys_only_where_teachers_are_called(launcher, production):
    assert "-e RAY_AUTH_MODE=token" in launcher["docker"]["run_options"]
    assert "--env-file /home/ubuntu/orca-keys.env" in launcher["docker"]["run_options"]
    types = launcher["available_node_types"]
    # `ray up` runs the top-level list on the head; the autoscaler a worker type's own list, if it has one.
    written = {name: env_file_variables(launcher["initialization_commands"] if name == launcher["head_node_type"]
                                        else t.get("initialization_commands", launcher["initialization_commands"]))
               for name, t in types.items()}
    assert all("RAY_AUTH_TOKEN" in names for names in written.values()), written
    keys = {e.api_key_env for e in (production.teachers.assistant, production.teachers.strong)}
    # The head runs the driver (`ray job submit`), the cpu workers the fan-out actors; the GPU workers neither.
    assert {name for name, names in written.items() if names & keys} == {"head", "cpu"}
    assert "HF_TOKEN" in written["gpu"]
    hosts = {name for name, t in types.items()
             if all(t["resources"].get(r, 0) >= amount for r, amount in production.ray.actor_resources.items())}
    assert hosts == {"cpu"}


# -- Ray cluster launcher -------------------------------------------------------------------
def validate_launcher(config: dict) -> None:
    """What `ray up` checks before it touches a cloud: the schema on the file, then on the filled-out config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(copy.deepcopy(config))
    validate_config(prepare_config(copy.deepcopy(config)))


def test_launcher_validates_with_rays_own_schema(launcher):
    validate_launcher(launcher)


def _set(config: dict, path: str, value: Any) -> dict:
    broken = copy.deepcopy(config)
    *parents, last = path.split(".")
    node = broken
    for key in parents:
        node = node[key]
    node[last] = value
    return broken


@pytest.mark.parametrize("path,value", [
    ("available_node_types.gpu.resources.GPU", "8"),      # resources must be integers
    ("max_worker", 8),                                    # a misspelt top-level field
    ("docker.imagee", "orca-pipeline:x"),                 # a misspelt docker field
    ("head_node_type", "no-such-type"),                   # the head must be one of the node types
    ("max_workers", 0),                                   # less than the node types' min_workers
    ("provider", {"region": "us-west-2"}),                # provider without a type
], ids=["gpu-as-string", "unknown-field", "unknown-docker-field", "bad-head-type", "max-below-min", "no-provider-type"])
def test_a_broken_launcher_config_fails_the_validator(launcher, path, value):
    broken = _set(launcher, path, value)
    if path == "max_workers":
        broken["available_node_types"]["gpu"]["min_workers"] = 1
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_launcher(broken)


def test_launcher_head_takes_no_work_and_gpu_nodes_fit_the_production_recipe(launcher, production):
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    assert any("--num-cpus=0" in cmd for cmd in launcher["head_start_ray_commands"])
    gpu = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert gpu, "a GPU worker node type"
    assert sum(t["max_workers"] for t in types.values() if t is not head) <= launcher["max_workers"]
    for name, t in gpu.items():
        assert t["resources"]["CPU"] / t["resources"]["GPU"] >= production.train.cpus_per_worker, name
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"], name
    assert sum(t["max_workers"] * t["resources"]["GPU"] for t in gpu.values()) >= production.train.workers
    # The image carries everything: no secrets synced, no per-node installs.
    assert launcher["file_mounts"] == {}
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert not any("pip install" in cmd for cmd in launcher.get(key, [])), key


# -- Prefect compose ------------------------------------------------------------------------
def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def test_compose_services_wait_for_healthy_dependencies(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "prefect-server", "prefect-worker"}
    db, server, worker = services["postgres"], services["prefect-server"], services["prefect-worker"]
    assert db["image"] == "postgres:16" and db.get("healthcheck", {}).get("test")
    db_volume = db["volumes"][0].split(":")[0]
    assert db_volume in compose["volumes"], "the database on a named volume"
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert server.get("healthcheck", {}).get("test"), "the worker waits for a healthy server"
    assert worker["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    command = " ".join(server["command"]) if isinstance(server["command"], list) else server["command"]
    assert "prefect server start" in command and "--host 0.0.0.0" in command
    command = " ".join(worker["command"]) if isinstance(worker["command"], list) else worker["command"]
    assert "prefect worker start" in command and "--pool orca-process" in command and "--type process" in command
    assert env_of(worker)["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    store_volume = next(v.split(":")[0] for v in worker["volumes"] if v.endswith(f":{STORE_MOUNT}"))
    assert store_volume in compose["volumes"]
    assert worker["build"]["dockerfile"] == str(DOCKERFILE.relative_to(REPO))
    assert (COMPOSE.parent / worker["build"]["context"]).resolve() == REPO


def test_compose_database_url_uses_asyncpg_and_the_password_placeholder(compose):
    url = env_of(compose["services"]["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"]
    m = re.fullmatch(r"postgresql\+asyncpg://(?P<user>\w+):(?P<password>\$\{[^}]+\})@postgres:5432/(?P<db>\w+)", url)
    assert m, url
    db_env = env_of(compose["services"]["postgres"])
    assert m["user"] == db_env["POSTGRES_USER"] and m["db"] == db_env["POSTGRES_DB"]
    assert m["password"].startswith("${POSTGRES_PASSWORD")


def published_ports(compose: dict) -> list[str]:
    ports = []
    for service in compose["services"].values():
        for port in service.get("ports", []):
            ports.append(port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published')}:{port['target']}")
    return ports


def test_compose_publishes_only_on_loopback(compose):
    ports = published_ports(compose)
    assert ports == ["127.0.0.1:4200:4200"], ports
    exposed = copy.deepcopy(compose)
    exposed["services"]["postgres"]["ports"] = ["5432:5432"]  # the broken twin: on every interface
    assert not all(p.startswith("127.0.0.1:") for p in published_ports(exposed))


SECRETISH = re.compile(r"(PASSWORD|API_KEY|TOKEN|SECRET)", re.I)
ENV_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?][^}]*)?\}$")


def literal_compose_secrets(compose: dict) -> list[str]:
    bad = []
    for name, service in compose["services"].items():
        for key, value in env_of(service).items():
            if SECRETISH.search(key) and value not in (None, "") and not ENV_REFERENCE.match(str(value)):
                bad.append(f"{name}.{key}")
    return bad


def test_compose_secrets_come_from_the_environment(compose):
    assert literal_compose_secrets(compose) == []
    leaked = copy.deepcopy(compose)
    leaked["services"]["prefect-worker"]["environment"]["OPENAI_API_KEY"] = "sk-live-0123456789abcdefghij"
    assert literal_compose_secrets(leaked) == ["prefect-worker.OPENAI_API_KEY"]


# -- no secrets in any deploy file ------------------------------------------------------------
SECRET_PATTERNS = [
    re.compile(r"sk-[A-Za-z0-9_\-]{16,}"),                                        # OpenAI keys
    re.compile(r"(?i)api[_-]?key[\"']?\s*[:=]\s*[\"']?(?!\$\{)[A-Za-z0-9_\-]{16,}"),  # api_key: <literal>
    re.compile(r"AKIA[0-9A-Z]{16}"),                                              # AWS access key ids
    re.compile(r"hf_[A-Za-z0-9]{30,}"),                                           # Hugging Face tokens
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?i)password[\"']?\s*[:=]\s*[\"']?(?![$<{])[^\s\"'$]{6,}"),        # password: <literal>
]


def secrets_in(text: str) -> list[str]:
    return [m.group(0) for pattern in SECRET_PATTERNS for m in pattern.finditer(text)]


def test_no_literal_secrets_in_deploy_files():
    files = [p for p in INFRA.rglob("*") if p.is_file()] + [DOCKERIGNORE]
    found = {str(p.relative_to(REPO)): s for p in files if (s := secrets_in(p.read_text()))}
    assert found == {}
    # The scanner catches the real thing.
    assert secrets_in("OPENAI_API_KEY: sk-proj-abcdefghijklmnop0123")
    assert secrets_in('api_key: "a1b2c3d4e5f6a7b8c9d0"')
    assert secrets_in("POSTGRES_PASSWORD: hunter2hunter2")
    assert not secrets_in("POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it}")


# -- Dockerfile -----------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n(?:\s*#[^\n]*\n)*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_builds_the_project_as_a_non_root_user():
    instructions = dockerfile_instructions()
    base = [args for word, args in instructions if word == "FROM"]
    assert len(base) == 1 and re.match(r"python:\$\{PYTHON_VERSION\}-slim", base[0]) and docker_arg("PYTHON_VERSION") == "3.11"
    users = [args for word, args in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image runs as a non-root user"
    installs = [args for word, args in instructions if word == "RUN" and "pip install -e" in args]
    assert len(installs) == 1, "one RUN installs the project"
    install = installs[0].split("pip install -e", 1)[1].split("&&")[0]  # the install command itself
    assert re.match(r'\s*"\.\[\$\{EXTRA\}\]"', install), "installs the project with its pinned extras"
    assert docker_arg("EXTRA") == "gpu" and {"cpu", "gpu"} <= set(PYPROJECT["project"]["optional-dependencies"])
    assert '"asyncpg' in install, "Prefect's Postgres driver, in the same resolve as the project"
    assert ("WORKDIR", "/app") in instructions
    assert any(word == "ENV" and "OMP_NUM_THREADS=1" in args for word, args in instructions)
    cmd = next(args for word, args in reversed(instructions) if word == "CMD")
    assert json.loads(cmd)[0] == "orca"
    assert secrets_in(DOCKERFILE.read_text()) == []


def test_prefect_deployments_find_the_code_in_the_image(compose):
    """prefect.yaml's pull step changes into the code folder: in the image that is WORKDIR /app."""
    prefect_yaml = INFRA / "prefect/prefect.yaml"
    if not prefect_yaml.is_file():
        pytest.skip("no infra/prefect/prefect.yaml")
    steps = yaml.safe_load(prefect_yaml.read_text())["pull"]
    directory = next(s["prefect.deployments.steps.set_working_directory"]["directory"] for s in steps
                     if "prefect.deployments.steps.set_working_directory" in s)
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for w, a in dockerfile_instructions() if w == "ENV")))
    if (m := re.fullmatch(r"\{\{\s*\$(\w+)\s*\}\}", directory)):
        directory = env.get(m.group(1))
    assert directory == "/app" and ("WORKDIR", "/app") in dockerfile_instructions(), directory
    assert compose["services"]["prefect-worker"]["working_dir"] == "/app"


def test_dockerfile_copies_every_top_level_package_dir():
    copied = set()
    for word, args in dockerfile_instructions():
        if word == "COPY":
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            copied |= {s.strip("/") for s in sources}
    packages = {p.rstrip("*").rstrip(".") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    wanted = {d for d in packages | {"configs", "infra"} if (REPO / d).is_dir()}
    assert wanted >= {"orca_core", "tasks", "flows", "configs", "infra"}
    assert not (missing := wanted - copied), f"Dockerfile does not COPY {sorted(missing)}"
    # The dependency layer's editable install sees an empty stub of every package (else it maps none for it).
    install = next(args for word, args in dockerfile_instructions() if word == "RUN" and "pip install -e" in args)
    stubs = set(re.search(r"mkdir -p ([\w ]+?)\s+&&", install).group(1).split())
    assert stubs == {d for d in packages if (REPO / d).is_dir()}, stubs
    assert {"pyproject.toml", "README.md"} <= copied


def test_dockerignore_keeps_the_context_small_and_secret_free():
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert {".venv", "runs", "bench-data", ".git", ".env"} <= ignored, ignored
    copied = {a for w, args in dockerfile_instructions() if w == "COPY" for a in args.split()[:-1] if not a.startswith("--")}
    assert not {c.strip("/") for c in copied} & ignored, "the Dockerfile copies something .dockerignore drops"


# -- Prefect Kubernetes work-pool template ----------------------------------------------------
def undeclared(template: dict) -> set[str]:
    used = set(PLACEHOLDER.findall(json.dumps(template["job_configuration"])))
    return used - set(template["variables"]["properties"])


def test_k8s_template_declares_every_placeholder_it_uses(template):
    from prefect.server.schemas.actions import validate_base_job_template

    assert set(template) == {"job_configuration", "variables"}
    text = json.dumps(template["job_configuration"])
    for name in ("image", "command", "env", "namespace", "name", "gpus", "store_pvc"):
        assert "{{ %s }}" % name in text, name
    assert undeclared(template) == set()
    validate_base_job_template(template)  # what the server runs on `prefect work-pool create`

    broken = copy.deepcopy(template)
    broken["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["nodeSelector"] = {"pool": "{{ gpu_pool }}"}
    assert undeclared(broken) == {"gpu_pool"}
    with pytest.raises(ValueError, match="gpu_pool"):
        validate_base_job_template(broken)


def test_k8s_template_renders_a_gpu_job_with_the_store_and_the_api_url(template):
    job = rendered_job(template)
    assert not PLACEHOLDER.search(json.dumps(job)), "every placeholder has a default or is dropped"
    manifest = job["job_manifest"]
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    pod = manifest["spec"]["template"]["spec"]
    # What prefect-kubernetes insists on (its base manifest): these values, this container name.
    assert (pod["restartPolicy"], pod["parallelism"], pod["completions"]) == ("Never", 1, 1)
    container = pod["containers"][0]
    assert container["name"] == "prefect-job"
    assert container["image"] == template["variables"]["properties"]["image"]["default"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert job["env"]["PREFECT_API_URL"].endswith(":4200/api")
    key_refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert set(key_refs) >= {"OPENAI_API_KEY", "AZURE_OPENAI_API_KEY"} and all(r["optional"] for r in key_refs.values())
    # A deployment's job_variables override the defaults.
    custom = rendered_job(template, gpus=4, image="registry.example/orca-pipeline:0.1.0-ray2.60.0")
    custom_container = custom["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert custom_container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert custom_container["image"] == "registry.example/orca-pipeline:0.1.0-ray2.60.0"


# -- DeepSpeed configs ----------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((INFRA / "deepspeed").glob("*.json")), ids=lambda p: p.stem)
def test_deepspeed_config_matches_its_file_name(path):
    config = json.loads(path.read_text())
    m = re.match(r"zero(\d)", path.stem)
    assert m, f"{path.name}: name it zero<stage>[_...].json"
    zero = config["zero_optimization"]
    assert zero["stage"] == int(m.group(1))
    assert ("bf16" in path.stem) == bool(config.get("bf16", {}).get("enabled"))
    assert ("offload" in path.stem) == ("offload_optimizer" in zero or "offload_param" in zero)


def test_recipes_point_at_existing_deepspeed_configs(production):
    for name in ("tiny", "smoke", "orca2-7b"):
        recipe = production if name == "orca2-7b" else load_recipe(name)
        path = REPO / recipe.train.deepspeed_config
        assert path.is_file() and path.parent == INFRA / "deepspeed", (name, recipe.train.deepspeed_config)
    config = json.loads((REPO / production.train.deepspeed_config).read_text())
    assert config["zero_optimization"]["stage"] == production.train.zero_stage
    assert config["bf16"]["enabled"] == (production.train.precision == "bf16")


# -- the README says how to use them ----------------------------------------------------------
def test_infra_readme_names_each_file_and_the_recipe_fields_that_use_them():
    readme = (INFRA / "README.md").read_text()
    for path in (RAYCLUSTER, LAUNCHER, COMPOSE, JOB_TEMPLATE, DOCKERFILE):
        assert str(path.relative_to(REPO)) in readme, path.name
    for field in ("ray.address", "store.root", "train.workers", "train.use_gpu", "train.cpus_per_worker",
                  "train.deepspeed_config", "train.zero_stage", "train.precision", "eval.backend",
                  "eval.tensor_parallel_size", "eval.dtype", "teachers.", "PREFECT_API_URL",
                  "ray.actor_resources", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "orca-ray-auth", "NetworkPolicy"):
        assert field in readme, field
    assert f"prefect work-pool create orca-k8s --type kubernetes --base-job-template {JOB_TEMPLATE.relative_to(REPO)}" in readme


# -- joining Ray: tasks/ray_runtime.py --------------------------------------------------------------------
@pytest.fixture
def ray_init_calls(monkeypatch) -> list[tuple[str | None, dict]]:
    """ray.init recorded instead of run, with the RAY_AUTH_MODE it would have started with (restored afterwards)."""
    import ray

    calls: list[tuple[str | None, dict]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append((os.environ.get("RAY_AUTH_MODE"), kwargs)))
    monkeypatch.setenv("RAY_AUTH_MODE", "set-by-the-fixture")  # records the variable's state, so the next line's
    monkeypatch.delenv("RAY_AUTH_MODE")                         # removal and whatever ensure_ray sets are undone
    return calls


def test_the_private_local_runtime_starts_without_auth_and_offers_the_pinning_resources(ray_init_calls):
    recipe = load_recipe("tiny", ["ray.actor_resources={teacher_keys: 1}"])
    assert recipe.ray.address == "local"
    ensure_ray(recipe)
    [(mode, kwargs)] = ray_init_calls
    assert mode == "disabled"
    assert kwargs["address"] == "local" and kwargs["num_cpus"] == recipe.ray.num_cpus
    assert kwargs["_temp_dir"].endswith(f"orca-ray-{os.getuid()}")
    assert kwargs["resources"] == {"teacher_keys": LOCAL_PINNING_AMOUNT}
    assert fanout_actor_options(recipe) == {"num_cpus": recipe.ray.actor_cpus, "resources": {"teacher_keys": 1.0}}
    assert fanout_actor_options(load_recipe("tiny")) == {"num_cpus": recipe.ray.actor_cpus}
    # An operator's explicit choice stands, even for the local runtime.
    os.environ["RAY_AUTH_MODE"] = "token"
    ensure_ray(recipe)
    assert ray_init_calls[-1][0] == "token"


@pytest.mark.parametrize("address", ["auto", "ray://orca-head-svc.orca.svc.cluster.local:10001"])
def test_joining_a_cluster_leaves_the_auth_mode_to_the_environment(ray_init_calls, address):
    ensure_ray(load_recipe("tiny", [f"ray.address={address}"]))
    [(mode, kwargs)] = ray_init_calls
    assert mode is None  # not forced off: Ray reads RAY_AUTH_MODE / RAY_AUTH_TOKEN, or finds a token itself
    assert kwargs["address"] == address and not {"num_cpus", "resources", "_temp_dir"} & set(kwargs)


HEAD_NODE = """
import sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
print(cluster.address, flush=True)
sys.stdin.read()  # until the test closes stdin
cluster.shutdown()
"""
DRIVER = """
import sys
import ray
from orca_core.recipe import load_recipe
from tasks.ray_runtime import ensure_ray
ensure_ray(load_recipe("tiny", ["ray.address=" + sys.argv[1]]))
print("answer", ray.get(ray.remote(lambda: 42).remote()))
"""


def test_a_driver_joins_a_token_cluster_with_the_infra_env_and_is_refused_without_it():
    """A real Ray node with token auth on, as infra/ray/ runs them: a driver with RAY_AUTH_MODE=token and the
    token joins through ensure_ray and runs a task; one without them is refused, told what to set."""
    root = Path(tempfile.mkdtemp(prefix="orca-auth-"))  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_TMPDIR": str(root), "HOME": str(root), "PYTHONPATH": str(REPO)}  # no shared /tmp/ray, no ~/.ray token
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    head = subprocess.Popen([sys.executable, "-c", HEAD_NODE], env=env | auth, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        address = head.stdout.readline().strip()
        assert address, "the token-auth head node did not start"

        def driver(extra: dict[str, str]) -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-c", DRIVER, address], env=env | extra, cwd=REPO,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        # Both at once; the refused one tries to connect twice, not Ray's default twenty times.
        joined, refused = driver(auth), driver({"RAY_gcs_server_port_wait_time_s": "2"})
        out, err = joined.communicate(timeout=240)
        assert joined.returncode == 0 and "answer 42" in out, err[-3000:]
        out, err = refused.communicate(timeout=240)
        assert refused.returncode != 0 and "answer" not in out
        assert "could not join the cluster" in err and "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN" in err, err[-3000:]
    finally:
        head.stdin.close()  # the node stops its own processes
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # the group this test started, and only it
            head.wait()
        shutil.rmtree(root, ignore_errors=True)
