"""orca-pipeline's library: plain functions and models, no Prefect and no Ray."""

__version__ = "0.1.0"
