"""Load a recipe: YAML file (or a name in `configs/`), `extends:` parents, `--set` overrides.

Every error names the file and the field path, before any work starts:
    configs/bad.yaml: curriculum.stages[1].epochs: must be > 0 (got 0)
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from orca_core.keys import canonical_json, sha256_text
from orca_core.recipe.models import Recipe

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and field."""


def config_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("ORCA_CONFIG_PATH", "").split(os.pathsep) if p]
    return [*extra, Path.cwd() / "configs", REPO_CONFIGS]


def resolve_recipe_path(ref: str | Path, relative_to: Path | None = None) -> Path:
    """A path to a YAML file, or a recipe name looked up in the config folders."""
    candidates = [Path(ref)]
    if relative_to is not None:
        candidates.insert(0, relative_to / ref)
    if not str(ref).endswith((".yaml", ".yml")):
        candidates += [d / f"{ref}.yaml" for d in ([relative_to] if relative_to else []) + config_dirs()]
    for path in candidates:
        if path.is_file():
            return path
    names = sorted({p.stem for d in config_dirs() if d.is_dir() for p in d.glob("*.yaml")})
    raise RecipeError(f"recipe {str(ref)!r} not found (a YAML path, or one of: {', '.join(names)})")


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for name, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = deep_merge(merged[name], value)
        else:
            merged[name] = copy.deepcopy(value)
    return merged


def read_yaml(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe document at `path`, with its `extends:` parents merged underneath."""
    if path.resolve() in _chain:
        raise RecipeError(f"{path}: `extends` loops through {[str(p) for p in _chain]}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    parent_path = resolve_recipe_path(parent, relative_to=path.parent)
    return deep_merge(read_yaml(parent_path, (*_chain, path.resolve())), data)


_SEGMENT = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def parse_field_path(path: str) -> list[str | int]:
    """'curriculum.stages[1].epochs' (or 'curriculum.stages.1.epochs') -> ['curriculum', 'stages', 1, 'epochs']."""
    parts: list[str | int] = []
    for name, index in _SEGMENT.findall(path):
        parts.append(int(index) if index else (int(name) if name.isdigit() else name))
    if not parts:
        raise RecipeError(f"--set {path!r}: empty field path")
    return parts


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `field.path=value` (value parsed as YAML: 1e-4, true, [a, b], null)."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected FIELD=VALUE, e.g. train.lr=1e-4")
    path, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise RecipeError(f"--set {assignment!r}: value is not valid YAML: {err}") from None
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value):
        value = float(value)  # YAML 1.1 reads 1e-4 as a string
    parts = parse_field_path(path.strip())
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        child = node[part] if _has(node, part) else None
        if child is None:
            if isinstance(part, int):
                raise RecipeError(f"--set {assignment!r}: {_show(parts[: depth + 1])} does not exist")
            child = {}
            node[part] = child
        node = child
    last = parts[-1]
    if isinstance(last, int) and not _has(node, last):
        raise RecipeError(f"--set {assignment!r}: {_show(parts)} does not exist")
    node[last] = value


def _has(node: Any, part: str | int) -> bool:
    if isinstance(part, int):
        return isinstance(node, list) and 0 <= part < len(node)
    return isinstance(node, dict) and part in node


def _show(loc: Sequence[str | int]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


_MESSAGES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "extra_forbidden": "unknown field (check the spelling)",
    "missing": "required field is missing",
    "too_short": "must have at least {min_length} item(s)",
}


def describe(err: ValidationError) -> list[str]:
    lines = []
    for item in err.errors():
        loc = [part for part in item["loc"] if not (isinstance(part, str) and "[" in part)]  # union tags
        template = _MESSAGES.get(item["type"])
        ctx = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in item.get("ctx", {}).items()}
        message = template.format(**ctx) if template else item["msg"].removeprefix("Value error, ")
        got = "" if item["type"] in ("missing", "extra_forbidden") or isinstance(item.get("input"), dict) else f" (got {item.get('input')!r})"
        lines.append(f"{_show(loc) or '<top>'}: {message}{got}")
    return lines


def load_recipe(ref: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """The validated recipe; raises RecipeError naming the file and every bad field."""
    path = resolve_recipe_path(ref)
    data = read_yaml(path)
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        where = f"{path}" + (f" (with --set {' '.join(overrides)})" if overrides else "")
        raise RecipeError(f"{where}: invalid recipe\n  " + "\n  ".join(describe(err))) from None


def recipe_hash(recipe: Recipe) -> str:
    return sha256_text(canonical_json(recipe.model_dump(mode="json")))


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, width=100)
