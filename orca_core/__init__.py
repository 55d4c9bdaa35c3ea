"""orca-pipeline's library: plain functions and models, no Prefect and no Ray."""

import os

# Arrow's C++ default pool (mimalloc) serves what pyarrow cannot be handed a pool for: the Parquet reader and
# writer properties of every request shard read, written or merged. It kept that memory, so a fan-out driver's
# RSS grew with the prompts (1.27x from 100K to 1M); the system allocator returns it. Arrow reads this once,
# when pyarrow loads, so it is set here, before any module of the library imports pyarrow; a user's own
# setting wins.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

__version__ = "0.1.0"
