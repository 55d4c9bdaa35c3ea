"""`make serve`: a Prefect server on 127.0.0.1:4200 (SQLite) and the served deployments.

    orca serve [--port 4200] [--recipe tiny] [--no-server]

Deployments (run them from the dashboard's Run button, the API, or
`prefect deployment run NAME`; parameters are a recipe plus `--set` overrides):
    orca-pipeline/orca-pipeline        the whole DAG
    orca-generate/orca-generate        sources, fan-out, filters
    orca-train/orca-train              tokenizer, base model, the curriculum
    orca-evaluate/orca-evaluate        eval of base and each stage, report
    orca-evaluate-checkpoint/orca-evaluate-checkpoint   one checkpoint folder
    nightly-eval/nightly-eval          cron 02:00 UTC: newest checkpoints, regression check
Flow runs execute in subprocesses of this process (Prefect's runner). For a
work pool instead, see infra/prefect/prefect.yaml.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prefect import serve
from prefect.client.schemas.schedules import CronSchedule
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.evaluate import orca_evaluate_checkpoint
from flows.nightly import nightly_eval
from flows.pipeline import orca_evaluate, orca_generate, orca_pipeline, orca_train

NIGHTLY_CRON = "0 2 * * *"


def start_server(port: int, home: Path) -> subprocess.Popen:
    """`prefect server start` on 127.0.0.1 with its SQLite database under `home`."""
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    env.pop("PREFECT_API_URL", None)  # the server must not try to talk to another one
    return subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, start_new_session=True)


def wait_healthy(api_url: str, timeout_s: float = 120.0, server: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {server.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"Prefect API {api_url} not healthy after {timeout_s:.0f} s")


def deployments(recipe: str = "tiny") -> list:
    common = {"parameters": {"recipe": recipe, "overrides": []}}
    return [
        orca_pipeline.to_deployment(name="orca-pipeline", description="The whole DAG, every step cached.", **common),
        orca_generate.to_deployment(name="orca-generate", description="Sources, teacher fan-out, filters.", **common),
        orca_train.to_deployment(name="orca-train", description="Tokenizer, base model, curriculum stages.", **common),
        orca_evaluate.to_deployment(name="orca-evaluate", description="Eval of base and each stage, report.", **common),
        orca_evaluate_checkpoint.to_deployment(name="orca-evaluate-checkpoint",
                                               description="Score one checkpoint folder (parameter: checkpoint).",
                                               parameters={"recipe": recipe, "overrides": []}),
        nightly_eval.to_deployment(name="nightly-eval", description="Newest checkpoints; fails on a regression.",
                                   schedules=[CronSchedule(cron=NIGHTLY_CRON, timezone="UTC")],
                                   parameters={"recipe": recipe, "overrides": [], "checkpoints": None}),
    ]


def main(port: int = 4200, recipe: str = "tiny", start: bool = True, home: Path | None = None) -> None:
    api_url = os.environ.get("PREFECT_API_URL") if not start else f"http://127.0.0.1:{port}/api"
    if not api_url:
        raise RuntimeError("--no-server needs PREFECT_API_URL pointing at a running Prefect server")
    server = start_server(port, home or Path(".prefect-server").resolve()) if start else None
    try:
        wait_healthy(api_url, server=server)
        os.environ["PREFECT_API_URL"] = api_url  # the flow runs this process starts use the server...
        with temporary_settings(updates={PREFECT_API_URL: api_url}):  # ...and so does this one (settings load at import)
            print(f"Prefect UI: {api_url.removesuffix('/api')}  (deployments below; Ctrl-C stops)", flush=True)
            serve(*deployments(recipe))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
