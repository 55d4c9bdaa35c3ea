"""The data steps as Prefect tasks: sources, strategy selection, teacher traces, filters."""

from orca_core import steps
from tasks.step import prefect_step

sources_task = prefect_step(steps.SOURCES)
strategies_task = prefect_step(steps.STRATEGIES)
traces_orca1_task = prefect_step(steps.TRACES_ORCA1)
traces_orca2_task = prefect_step(steps.TRACES_ORCA2)
filtered_orca1_task = prefect_step(steps.FILTERED_ORCA1)
filtered_orca2_task = prefect_step(steps.FILTERED_ORCA2)
