"""The sources step as a Prefect task."""

from tasks.step import prefect_step
from orca_core.steps import SOURCES

sources_task = prefect_step(SOURCES)
