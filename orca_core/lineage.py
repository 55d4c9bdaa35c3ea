"""Lineage: the chain of artifacts an artifact was built from, read from the store alone.

Every artifact's `key.json` names its upstream keys, so the chain report ->
eval -> checkpoint -> dataset -> traces -> sources is a walk over key files;
nothing outside the store is consulted. Each node shows what a person asks
first: teacher models and prompt set for traces, stage settings for training,
suite and backend for evaluation, and the recipe hash and code version from
the manifest's provenance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orca_core.store import ArtifactStore

HEX = set("0123456789abcdef")


@dataclass
class Node:
    step: str
    key: str
    created_at: str
    rows: dict[str, int]
    details: dict[str, Any]
    provenance: dict[str, Any]
    upstream: list[Node] = field(default_factory=list)


def find(store: ArtifactStore, ref: str) -> tuple[str, str]:
    """(step, key) of an artifact named by its folder path, `step/key`, or a key (prefix of 8+ hex digits)."""
    path = Path(ref).expanduser()
    if path.is_dir() and (path / "key.json").is_file():
        return path.parent.name, path.name
    if "/" in ref:
        step, prefix = ref.rstrip("/").rsplit("/", 1)
        steps = [Path(step).name]
    else:
        prefix, steps = ref, [p.rsplit("/", 1)[-1] for p in store.fs.ls(store.url(), detail=False)
                              if not p.rsplit("/", 1)[-1].startswith(".")]
    if len(prefix) < 8 or not set(prefix) <= HEX:
        raise ValueError(f"{ref!r}: not an artifact folder, STEP/KEY, or a key prefix of at least 8 hex digits")
    matches = [(step, key) for step in steps for key in store.keys(step) if key.startswith(prefix)]
    if not matches:
        raise LookupError(f"no artifact with key {prefix}... in {store.url()}")
    if len(matches) > 1:
        raise LookupError(f"key prefix {prefix} is ambiguous: " + ", ".join(f"{s}/{k[:16]}" for s, k in matches))
    return matches[0]


def _details(step: str, config: dict[str, Any]) -> dict[str, Any]:
    """The few key components worth showing for each kind of step."""
    out: dict[str, Any] = {}
    for role in ("assistant", "strong"):
        if isinstance(config.get(role), dict):
            teacher = config[role]
            out[f"{role} teacher"] = f"{teacher.get('kind')}:{teacher.get('model')}"
    if "prompts_digest" in config:
        out["prompt set"] = str(config["prompts_digest"])[:12]
    if "stage" in config and isinstance(config["stage"], dict):
        stage = config["stage"]
        out["stage"] = {k: stage[k] for k in ("name", "data", "epochs", "steps", "orca1_replay_ratio") if k in stage}
    if step.startswith("train-") and isinstance(config.get("train"), dict):
        out["train"] = {k: config["train"].get(k) for k in ("lr", "micro_batch_size", "max_len", "precision", "zero_stage")}
    if isinstance(config.get("eval"), dict):
        ev = config["eval"]
        out["eval"] = {k: ev.get(k) for k in ("suite", "backend", "system_messages", "max_new_tokens", "limit")}
    if step == "sources" and isinstance(config.get("sources"), dict):
        procedural = config["sources"].get("procedural") or {}
        out["sources"] = {"procedural families": len(procedural.get("suite", {}) or []),
                          "flan": bool(config["sources"].get("flan")), "seed": config["sources"].get("seed")}
    if "model" in config and isinstance(config["model"], dict):
        out["model"] = config["model"].get("kind")
    return out


def lineage(store: ArtifactStore, step: str, key: str, _seen: dict[str, Node] | None = None) -> Node:
    seen = {} if _seen is None else _seen
    if f"{step}/{key}" in seen:
        return seen[f"{step}/{key}"]
    if store.check(step, key) == "absent":
        raise LookupError(f"{step}/{key[:16]} is not in the store {store.url()}")
    comps = store.read_json(step, key, "key.json")
    manifest = store.read_json(step, key, "manifest.json")
    node = Node(step, key, manifest.get("created_at", ""), manifest.get("rows", {}),
                _details(step, comps.get("config", {})), manifest.get("stats", {}).get("provenance", {}))
    seen[f"{step}/{key}"] = node
    for name, upstream_key in comps.get("upstream", {}).items():
        try:
            node.upstream.append(lineage(store, name, upstream_key, seen))
        except LookupError:
            node.upstream.append(Node(name, upstream_key, "", {}, {"missing": "not in this store"}, {}))
    return node


def render(node: Node) -> list[str]:
    """Indented lines; an artifact reached twice is shown once, then referred to."""
    lines: list[str] = []
    shown: set[str] = set()

    def walk(n: Node, depth: int) -> None:
        pad = "  " * depth + ("└─ " if depth else "")
        ident = f"{n.step}/{n.key[:12]}"
        if ident in shown:
            lines.append(f"{pad}{ident} (see above)")
            return
        shown.add(ident)
        rows = ", ".join(f"{k}={v}" for k, v in n.rows.items())
        lines.append(f"{pad}{ident}  {n.created_at}  {rows}")
        info = dict(n.details)
        if n.provenance:
            info["recipe"] = f"{n.provenance.get('recipe')} {str(n.provenance.get('recipe_hash', ''))[:12]}"
            info["code"] = n.provenance.get("code_version")
        for name, value in info.items():
            lines.append(f"{'  ' * (depth + 1)}   {name}: {value}")
        for up in n.upstream:
            walk(up, depth + 1)

    walk(node, 0)
    return lines
