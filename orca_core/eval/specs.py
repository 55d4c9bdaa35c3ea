"""Which benchmarks a recipe evaluates on and decontaminates against, and what of them enters a key.

Apart from the evaluation steps on purpose: the filter steps read it, and a step's key
digests the modules its code reaches (`code_digest`), so the filters' keys do not
follow edits to generation, scoring or the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orca_core.eval.benchmarks import BenchmarkSpec, load_pairs, suite_specs
from orca_core.filters import EvalText
from orca_core.keys import file_sha256, folder_hashes
from orca_core.recipe.models import Recipe


def benchmark_specs(recipe: Recipe) -> list[BenchmarkSpec]:
    if recipe.eval.suite == "custom":
        return list(recipe.eval.benchmarks)
    return suite_specs(recipe.eval.suite, Path(recipe.eval.data_dir).expanduser())


def spec_fields(spec: BenchmarkSpec) -> dict[str, Any]:
    fields = spec.model_dump(mode="json", exclude={"revision"})
    if fields.get("path"):
        fields["path"] = "<local data>"  # its files' hashes are the input
    elif (commit := spec.hub_commit()) is not None:
        fields["revision"] = commit  # the commit loaded, not the branch named (orca_core/hub.py)
    return fields


def file_hashes(specs: list[BenchmarkSpec], recipe: Recipe) -> dict[str, Any]:
    """Content hashes of local benchmark files (never their paths)."""
    hashes = {}
    for spec in specs:
        if spec.path:
            path = Path(spec.path).expanduser()
            if path.is_file():
                hashes[spec.name] = {path.name: file_sha256(path)}
            elif path.is_dir():
                hashes[spec.name] = folder_hashes(str(path))
            else:
                raise FileNotFoundError(f"eval benchmark {spec.name}: {path} does not exist"
                                        + (" (run `make bench-data`)" if recipe.eval.suite == "real-offline" else ""))
    return {"benchmark_files": hashes} if hashes else {}


# -- decontamination: the filter steps read the eval benchmarks ---------------------------
def contamination_specs(recipe: Recipe) -> list[BenchmarkSpec]:
    """The recipe's real eval benchmarks, whole (the held-out split is checked by equality already)."""
    if recipe.filters.contamination_ngram is None:
        return []
    return [spec.model_copy(update={"limit": None, "tasks": None}) for spec in benchmark_specs(recipe)
            if spec.name != "procedural-heldout"]


def contamination_reads(recipe: Recipe) -> dict[str, Any]:
    specs = contamination_specs(recipe)
    return {"decontaminate_against": [spec_fields(s) for s in specs]} if specs else {}


def contamination_inputs(recipe: Recipe) -> dict[str, Any]:
    return file_hashes(contamination_specs(recipe), recipe)


# The public-schema field holding the context several questions share (filters.EvalText.passage).
PASSAGE_FIELDS = {"drop": "passage", "race": "article", "agieval": "passage"}


def contamination_texts(recipe: Recipe) -> list[EvalText]:
    """Every prompt of the real eval benchmarks, with its benchmark/task and passage: overlapping traces are dropped."""
    return [EvalText(example.prompt, f"{example.benchmark}/{example.task}",
                     str(row.data.get(PASSAGE_FIELDS.get(spec.name, "")) or "").strip())
            for spec in contamination_specs(recipe) for example, row in load_pairs(spec)]
