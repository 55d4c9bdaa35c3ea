"""Prefect flows: compose the tasks; each reads like its part of the DAG."""

import tasks  # noqa: F401  (sets Prefect's embedded defaults before prefect is imported)
