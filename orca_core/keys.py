"""Step keys: the content address of every artifact.

key = sha256(canonical JSON of {step, version, config, upstream, inputs, code})

- `config`: the recipe fields the step reads (and nothing else),
- `upstream`: the keys of the artifacts it consumes,
- `inputs`: sha256 of the content of any input file (data, tokenizer, ...),
- `code`: digests of the project modules that build it and the versions of the
  libraries whose output lands in it (`code_digest`).

Never output paths, timestamps or run ids: the same inputs give the same key
on any machine, in any process, on any day.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

KEY_SCHEMA = 2  # 2: keys hold the code that builds the artifact; bump only if the key recipe itself changes (invalidates every cache)


def canonical_json(obj: Any) -> str:
    """One text per value: sorted keys, no whitespace, no NaN, UTF-8 as is."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def folder_hashes(path: str | Path | None) -> dict[str, str]:
    """sha256 of every file under a folder, by relative path ({} when there is no such folder)."""
    folder = Path(path or "").expanduser()
    if not path or not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def key_components(
    step: str,
    version: int,
    config: Mapping[str, Any],
    upstream: Mapping[str, str] | None = None,
    inputs: Mapping[str, str] | None = None,
    code: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything a step's output depends on, as plain JSON (this is `key.json`)."""
    components = {
        "key_schema": KEY_SCHEMA,
        "step": step,
        "version": version,
        "config": dict(config),
        "upstream": dict(upstream or {}),
        "inputs": dict(inputs or {}),
        "code": dict(code or {}),
    }
    canonical_json(components)  # fail now, with the offending value, if it is not plain JSON
    return components


def step_key(components: Mapping[str, Any]) -> str:
    return sha256_text(canonical_json(components))


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"config": {"a": [1, {"b": 2}]}} -> {"config.a[0]": 1, "config.a[1].b": 2}."""
    if isinstance(value, Mapping):
        if not value:
            return {prefix: {}} if prefix else {}
        out: dict[str, Any] = {}
        for name in sorted(value):
            out.update(flatten(value[name], f"{prefix}.{name}" if prefix else str(name)))
        return out
    if isinstance(value, list):
        if not value:
            return {prefix: []}
        out = {}
        for index, item in enumerate(value):
            out.update(flatten(item, f"{prefix}[{index}]"))
        return out
    return {prefix: value}


_MISSING = "<absent>"


def diff_components(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """The leaf fields that differ between two key.json documents: (path, old, new)."""
    flat_old, flat_new = flatten(old), flatten(new)
    paths = sorted(set(flat_old) | set(flat_new))
    return [
        (path, flat_old.get(path, _MISSING), flat_new.get(path, _MISSING))
        for path in paths
        if flat_old.get(path, _MISSING) != flat_new.get(path, _MISSING)
    ]
