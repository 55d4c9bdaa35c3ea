"""Joining Ray: a private local runtime by default, or the cluster the recipe names.

Its own module so the trainer and the fan-out share it without importing each other
(step keys digest the modules a step's code reaches).

Authentication (Ray's token auth, RAY_AUTH_MODE / RAY_AUTH_TOKEN, read by Ray itself):
- `ray.address: local`: Ray 2.60 turns token auth on for a runtime that `ray.init` starts
  and writes a token to ~/.ray/auth_token; the private runtime turns it off unless the
  environment already says otherwise. (Private means its own temp dir and CPUs: its GCS and
  raylet still listen on every interface, as Ray offers no loopback-only bind.)
- a cluster address: the driver leaves RAY_AUTH_MODE alone. The clusters of infra/ray/
  require `RAY_AUTH_MODE=token` and `RAY_AUTH_TOKEN` in the driver's environment (the
  flow-run pod gets both from the `orca-ray-auth` Secret).
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import ray

from orca_core.recipe.models import Recipe

AUTH_MODE = "RAY_AUTH_MODE"
# The private runtime has no keys to guard: it offers every pinning resource of `ray.actor_resources`
# without a practical limit, so a recipe written for a cluster runs here unchanged.
LOCAL_PINNING_AMOUNT = 1_000_000.0
_JOINING = threading.Lock()  # steps may run at once in a flow's threads: one of them starts or joins Ray


def fanout_actor_options(recipe: Recipe) -> dict[str, Any]:
    """`.options(...)` of a fan-out actor that calls teachers: its CPUs, and the custom resources
    that pin it to the nodes holding the teacher keys (infra/ray/: the `cpu` worker group)."""
    options: dict[str, Any] = {"num_cpus": recipe.ray.actor_cpus}
    if recipe.ray.actor_resources:
        options["resources"] = dict(recipe.ray.actor_resources)
    return options


def ensure_ray(recipe: Recipe) -> None:
    with _JOINING:
        if not ray.is_initialized():
            if recipe.ray.address == "local":
                _in_keeper_thread(_join, recipe)
            else:
                _join(recipe)


def _in_keeper_thread(start, recipe: Recipe) -> None:
    """Run `start(recipe)` (ray.init of a local runtime) in a thread that lives as long as the process.

    Ray starts the local runtime's GCS, raylet and agents with PR_SET_PDEATHSIG (they die with their parent), and
    Linux sends that signal when the *thread* that started them exits, not the process. A step runs in a thread
    of the flow's task runner: a runtime started there was killed with the pool's threads at the end of the flow,
    and the next step to use Ray found it gone (the driver then exits: "connection to the plasma store failed").
    """
    started, errors = threading.Event(), []

    def keeper() -> None:
        try:
            start(recipe)
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            errors.append(error)
        finally:
            started.set()
        if not errors:
            threading.Event().wait()  # parks for the life of the process (a daemon thread)

    threading.Thread(target=keeper, name="orca-ray-runtime", daemon=True).start()
    started.wait()
    if errors:
        raise errors[0]


def _join(recipe: Recipe) -> None:
    cfg = recipe.ray
    common: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if cfg.address == "local":
        if not os.environ.get(AUTH_MODE):
            os.environ[AUTH_MODE] = "disabled"
        # A private runtime with its own temp dir: /tmp/ray is shared with every other user of the machine.
        temp_dir = Path(tempfile.gettempdir()) / f"orca-ray-{os.getuid()}"
        resources = {name: LOCAL_PINNING_AMOUNT for name in cfg.actor_resources} or None
        ray.init(address="local", num_cpus=cfg.num_cpus, resources=resources, _temp_dir=str(temp_dir), **common)
        return
    try:
        ray.init(address=cfg.address, **common)
    except ConnectionError as err:
        if os.environ.get(AUTH_MODE) == "token":
            raise
        raise ConnectionError(
            f"ray.address={cfg.address!r}: could not join the cluster ({err}). A cluster of infra/ray/ "
            f"requires token authentication: set {AUTH_MODE}=token and RAY_AUTH_TOKEN (the `orca-ray-auth` "
            "Secret) in the driver's environment") from err
