"""Submitted Batch API batches, recorded in the store so a killed run collects them instead of paying again.

One JSON file per submission, `<requests>/batches/<submission>.json`:
{submission, role, model, requests, created_at, input_file_id, batch_id,
state}. It is written after the upload (batch_id still null), again once the
batch exists, and last when its rows are in the request cache (state
`collected`). A record left with a null batch id is looked up at the
provider by the submission id the batch carries in its metadata. Each write
replaces the whole file atomically (a rename on a local store, one PUT on an
object store), so a reader never sees half a record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from orca_core.store import filesystem

OPEN_STATES = ("submitting", "submitted")  # what `open` returns: batches that may still hold unpaid answers


class BatchRecords:
    def __init__(self, folder: str | Path):
        self.fs, self.root = filesystem(str(folder))  # no listing cache on object stores
        self.fs.makedirs(self.root, exist_ok=True)

    def _path(self, submission: str) -> str:
        return f"{self.root.rstrip('/')}/{submission}.json"

    def write(self, record: dict[str, Any]) -> None:
        data = json.dumps(record, sort_keys=True).encode()
        path = self._path(record["submission"])
        if isinstance(self.fs, LocalFileSystem):
            temp = Path(f"{path}.tmp")
            temp.write_bytes(data)
            os.replace(temp, path)
        else:
            self.fs.pipe_file(path, data)

    def all(self) -> list[dict[str, Any]]:
        paths = sorted(p for p in self.fs.glob(f"{self.root.rstrip('/')}/*.json"))
        return [json.loads(self.fs.cat_file(p)) for p in paths]

    def open(self) -> list[dict[str, Any]]:
        """Records of batches not yet collected, oldest first."""
        return sorted((r for r in self.all() if r["state"] in OPEN_STATES), key=lambda r: r["created_at"])
