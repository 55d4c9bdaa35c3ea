"""Dashboard reruns against a real Prefect server: what the UI's Run button does, twice.

`orca serve` starts a Prefect server on 127.0.0.1 and serves the deployments;
the test triggers `orca-pipeline` through the API (POST create_flow_run, as
the Run button does), then again with a changed eval parameter: every upstream
task run must be Cached and only the evaluations and the report run. A
headless-Chromium screenshot of the deployment page is kept in
`test-artifacts/`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
DEPLOYMENTS = ["orca-pipeline/orca-pipeline", "orca-generate/orca-generate", "orca-train/orca-train",
               "orca-evaluate/orca-evaluate", "orca-evaluate-checkpoint/orca-evaluate-checkpoint", "nightly-eval/nightly-eval"]
FAKE_KEY = "sk-fake-orca-0123456789abcdef"  # the oracle teachers require a key; the test flow's, for a warm store
KEYED = ["teachers.assistant.api_key_env=ORCA_FAKE_TEACHER_KEY", "teachers.strong.api_key_env=ORCA_FAKE_TEACHER_KEY"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1400,900", "--virtual-time-budget=15000"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`orca serve` on a free port: a real server plus the served deployments; yields the API URL."""
    port, home = _free_port(), tmp_path_factory.mktemp("prefect-server")
    env = {**os.environ, "ORCA_FAKE_TEACHER_KEY": FAKE_KEY, "OMP_NUM_THREADS": "1", "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    log = (home / "serve.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("orca")), "serve", "--port", str(port), "--recipe", "smoke",
                             "--home", str(home / "server")], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        with temporary_settings(updates={PREFECT_API_URL: api}):
            deadline = time.monotonic() + 180
            while True:  # the server starts, then the runner registers the deployments
                assert proc.poll() is None, (home / "serve.log").read_text()[-3000:]
                try:
                    with get_client(sync_client=True) as client:
                        names = {f"{client.read_flow(d.flow_id).name}/{d.name}" for d in client.read_deployments()}
                    if set(DEPLOYMENTS) <= names:
                        break
                except Exception:
                    pass
                assert time.monotonic() < deadline, (home / "serve.log").read_text()[-3000:]
                time.sleep(1)
            yield api
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _task_states(flow_run_id) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs if run.name.rsplit("-", 1)[0] != "publish-report"}


def test_served_deployments_rerun_from_the_api_with_a_changed_eval_parameter(served, smoke_store):
    overrides = [f"store.root={smoke_store}", *KEYED]
    with temporary_settings(updates={PREFECT_API_URL: served}):
        with get_client(sync_client=True) as client:
            nightly = client.read_deployment_by_name("nightly-eval/nightly-eval")
            pipeline = client.read_deployment_by_name("orca-pipeline/orca-pipeline")
        assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
        assert nightly.schedules[0].schedule.timezone == "UTC" and nightly.schedules[0].active
        assert pipeline.parameters == {"recipe": "smoke", "overrides": []}

        first = run_deployment("orca-pipeline/orca-pipeline", parameters={"recipe": "smoke", "overrides": overrides},
                               timeout=1200)
        assert first.state.name == "Completed", first.state.message
        second = run_deployment("orca-pipeline/orca-pipeline", timeout=1200,
                                parameters={"recipe": "smoke", "overrides": [*overrides, "eval.max_new_tokens=32"]})
        assert second.state.name == "Completed", second.state.message
        states = _task_states(second.id)
        evaluation = {"eval-base", "eval-flan", "eval-orca1", "eval-orca2", "report"}
        assert {name for name, state in states.items() if state != "Cached"} == evaluation, states
        assert len(states) == 19 and all(states[name] == "Completed" for name in evaluation)

        # The deployment page as a person sees it.
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "deployment-page.png"
        shot.unlink(missing_ok=True)
        profile = ARTIFACTS / "chromium-profile"
        url = f"{served.removesuffix('/api')}/deployments/deployment/{pipeline.id}"
        subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}", url],
                       capture_output=True, timeout=120)
        image = Image.open(shot).convert("L")
        assert image.size == (1400, 900)
        low, high = image.getextrema()
        assert high - low > 100  # a rendered page, not a blank one


def test_prefect_yaml_deploys_every_flow_to_a_process_work_pool(served):
    """infra/prefect/prefect.yaml is what `prefect deploy --all` reads: it must deploy against a real server."""
    env = {**os.environ, "PREFECT_API_URL": served, "ORCA_REPO": str(REPO)}
    prefect = [sys.executable, "-m", "prefect"]
    pool = subprocess.run([*prefect, "work-pool", "create", "orca-process", "--type", "process", "--overwrite"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deployed = subprocess.run([*prefect, "--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect/prefect.yaml"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    with temporary_settings(updates={PREFECT_API_URL: served}):
        with get_client(sync_client=True) as client:
            pooled = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()
                      if d.work_pool_name == "orca-process"}
    assert set(pooled) == set(DEPLOYMENTS)
    nightly = pooled["nightly-eval/nightly-eval"]
    assert [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == [("0 2 * * *", "UTC")]
    assert pooled["orca-pipeline/orca-pipeline"].entrypoint == "flows/pipeline.py:orca_pipeline"
