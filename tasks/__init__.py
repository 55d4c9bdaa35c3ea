"""Prefect tasks: thin wrappers around `orca_core` steps (cache key, retries, logging).

Prefect reads its settings at import, so the embedded defaults are set here,
before anything imports prefect. An explicit environment always wins.
"""

import os

for _name, _value in {
    # The ephemeral API takes 25-35 s to start on a small machine; Prefect's default 20 s fails often.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # orca_core logs (corrupt artifacts, progress) go to the Prefect run logs too.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "orca_core",
    # orca_core also runs outside flows (CLI, tests): no warning when there is no run to log to.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}.items():
    os.environ.setdefault(_name, _value)
