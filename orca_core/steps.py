"""The DAG's steps: what each reads from the recipe, what it builds, and its key.

A `Step` is plain data + functions: `tasks/` wraps each one as a Prefect task
(cache key = step key), and `orca explain` uses the same definitions, so the
key that the CLI explains is the key the flow uses. Keys are derivable from
the recipe alone (upstream keys are computed, not looked up), so a whole
plan of keys exists before anything runs.

A step's key holds the digest of the code its builder reaches (`code_digest`): an edit
that changes behaviour invalidates exactly the steps that reach the edited module. Bump a
step's `version` for what that digest cannot see (a library's behaviour).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orca_core import curriculum, generate
from orca_core.eval import specs as eval_specs
from orca_core.eval import steps as evaluation
from orca_core.context import StepContext
from orca_core.filter_step import build_filtered
from orca_core.code_digest import code_components, function_entries
from orca_core.keys import (canonical_json, diff_components, file_sha256, key_components, sha256_text,
                            step_key)
from orca_core.provenance import provenance
from orca_core.recipe.models import Recipe
from orca_core.sources import build_sources_step
from orca_core.sources import flan as flan_source
from orca_core.sources import math as math_source
from orca_core.sources import procedural
from orca_core.sources.procedural import reasoning_gym_version
from orca_core.store import ArtifactRef, ArtifactStore
from orca_core.teacher.identity import ORACLE_ENTRY

log = logging.getLogger(__name__)

BuildFn = Callable[[Recipe, dict[str, Path], Path, StepContext], tuple[dict[str, int], dict[str, Any]]]


@dataclass(frozen=True)
class Step:
    name: str
    version: int
    reads: Callable[[Recipe], dict[str, Any]]  # the recipe fields the step reads (JSON)
    build: BuildFn  # (recipe, upstream artifact folders, output folder, context) -> (rows, stats)
    inputs: Callable[[Recipe], dict[str, Any]] = lambda recipe: {}  # content hashes of input files
    upstream: tuple[str, ...] | Callable[[Recipe], tuple[str, ...]] = field(default=())
    # Code that shapes the artifact but that the builder does not import: "module" or "module:function"
    # (a child process's module, the trainer the flow passes in, the oracle server).
    code: tuple[str, ...] | Callable[[Recipe], tuple[str, ...]] = field(default=())

    def upstream_of(self, recipe: Recipe) -> tuple[str, ...]:
        return self.upstream(recipe) if callable(self.upstream) else self.upstream

    def code_entries(self, recipe: Recipe) -> list[str]:
        extra = self.code(recipe) if callable(self.code) else self.code
        return [*function_entries(self.build), *extra]


# -- sources ---------------------------------------------------------------------
def _sources_reads(recipe: Recipe) -> dict[str, Any]:
    cfg = recipe.sources.model_dump(mode="json")
    if cfg.get("procedural"):
        # The suite's own settings are code, not recipe: key on what the generators will get.
        cfg["procedural"]["suite"] = procedural.effective_suite(recipe.sources.procedural)
        cfg["procedural"]["reasoning_gym"] = reasoning_gym_version()
    if cfg.get("flan"):
        cfg["flan"].pop("paths")  # file paths never enter a key: their content hashes do
        if Path(cfg["flan"]["dataset"] or "").expanduser().is_dir():
            cfg["flan"]["dataset"] = "<local folder>"
        if (commit := recipe.sources.flan.hub_commit()) is not None:
            cfg["flan"]["revision"] = commit  # the commit loaded, not the branch named (orca_core/hub.py)
        else:
            cfg["flan"].pop("revision")  # local data: keyed by content
    for orca2_only in ("few_shot", "math", "mixture"):  # absent: the key is the one without these fields
        if cfg[orca2_only] is None:
            cfg.pop(orca2_only)
    if cfg.get("math"):
        cfg["math"]["files"] = sorted(cfg["math"]["files"])  # task names; the files' content is in the inputs
        if cfg["math"]["generators"]:
            cfg["math"]["reasoning_gym"] = reasoning_gym_version()
    return {"sources": cfg}


def _sources_inputs(recipe: Recipe) -> dict[str, Any]:
    inputs = {"flan_files": flan_source.input_hashes(recipe.sources.flan)} if recipe.sources.flan else {}
    if recipe.sources.math and recipe.sources.math.files:
        inputs["math_files"] = math_source.input_hashes(recipe.sources.math)
    return inputs


SOURCES = Step("sources", version=1, reads=_sources_reads, build=build_sources_step, inputs=_sources_inputs)

# -- teacher fan-out and filters ------------------------------------------------------
def _oracle_code(*roles: str) -> Callable[[Recipe], tuple[str, ...]]:
    """The oracle server's code, when one of `roles` is the oracle: it writes the answers (in another process)."""
    def code(recipe: Recipe) -> tuple[str, ...]:
        oracle = any(getattr(recipe.teachers, role).kind == "oracle" for role in roles)
        return (ORACLE_ENTRY,) if oracle else ()
    return code


STRATEGIES = Step(
    "strategies", version=1, upstream=("sources",), build=generate.build_strategies, code=_oracle_code("strong"),
    reads=lambda r: {"prompts": r.prompts.model_dump(mode="json", include={"default_strategy", "strategies", "selection_samples"}),
                     "strong": generate.teacher_identity(r.teachers.strong), "prompts_digest": generate.prompts_digest(),
                     "seed": r.seed},
)
TRACES_ORCA1 = Step(
    "traces-orca1", version=1, upstream=("sources",), build=generate.build_orca1_traces,
    code=_oracle_code("assistant", "strong"),
    reads=lambda r: {"assistant": generate.teacher_identity(r.teachers.assistant),
                     "strong": generate.teacher_identity(r.teachers.strong),
                     "strong_fraction": r.prompts.strong_fraction, "prompts_digest": generate.prompts_digest(),
                     "seed": r.seed},
)
TRACES_ORCA2 = Step(
    "traces-orca2", version=1, upstream=("sources", "strategies"), build=generate.build_orca2_traces,
    code=_oracle_code("strong"),
    reads=lambda r: {"strong": generate.teacher_identity(r.teachers.strong),
                     "generic_system_message": r.prompts.generic_system_message,
                     "prompts_digest": generate.prompts_digest()},
)
def _filter_reads(recipe: Recipe) -> dict[str, Any]:
    # The real eval benchmarks join the key only when there are some: procedural-only keys stay as they were.
    return {"filters": recipe.filters.model_dump(mode="json"), **eval_specs.contamination_reads(recipe)}


FILTERED_ORCA1 = Step("filtered-orca1", version=1, upstream=("sources", "traces-orca1"),
                      build=build_filtered("traces-orca1", eval_specs.contamination_texts),
                      reads=_filter_reads, inputs=eval_specs.contamination_inputs)
FILTERED_ORCA2 = Step("filtered-orca2", version=1, upstream=("sources", "traces-orca2"),
                      build=build_filtered("traces-orca2", eval_specs.contamination_texts),
                      reads=_filter_reads, inputs=eval_specs.contamination_inputs)

DATA_STEPS = [SOURCES, STRATEGIES, TRACES_ORCA1, TRACES_ORCA2, FILTERED_ORCA1, FILTERED_ORCA2]
STEPS: dict[str, Step] = {step.name: step for step in DATA_STEPS}  # the steps every recipe has
FANOUT_STEPS = ("strategies", "traces-orca1", "traces-orca2")  # steps that send teacher requests


# -- tokenizer, base model, curriculum (made per recipe: the stages are data) -----------------
TOKENIZER = Step("tokenizer", version=1, upstream=curriculum.tokenizer_upstream, build=curriculum.build_tokenizer,
                 reads=curriculum.tokenizer_reads,
                 inputs=lambda r: {"tokenizer_files": curriculum.pretrained_files(r.model.tokenizer)})
BASE_MODEL = Step("base-model", version=1, upstream=("tokenizer",), build=curriculum.build_base_model,
                  reads=curriculum.base_model_reads,
                  inputs=lambda r: {"model_files": curriculum.pretrained_files(r.model)})


def curriculum_steps(recipe: Recipe) -> list[Step]:
    made, previous = [], "base-model"
    for stage in recipe.curriculum.stages:
        made.append(Step(f"dataset-{stage.name}", version=1,
                         upstream=("sources", "tokenizer", *curriculum.traces_needed(stage)),
                         build=curriculum.build_dataset_for(stage),
                         reads=lambda r, stage=stage: {"stage": stage.model_dump(mode="json", include={"data", "orca1_replay_ratio"}),
                                                       "max_len": r.train.max_len, "overlong": r.train.overlong, "seed": r.seed}))
        made.append(Step(f"train-{stage.name}", version=1, upstream=(previous, f"dataset-{stage.name}"),
                         build=curriculum.build_train_for(stage, previous), reads=curriculum.train_reads_for(stage),
                         code=TRAINER_CODE,
                         inputs=lambda r: {"deepspeed_config": file_sha256(curriculum.deepspeed_config_path(r))}))
        previous = f"train-{stage.name}"
    return made


TRAINER_CODE = ("tasks.train",)  # the Ray Train loop the flow hands the train steps
GENERATION_CODE = ("orca_core.eval.vllm_generate",)  # the vLLM child process


def eval_steps(recipe: Recipe) -> list[Step]:
    """`eval-<model>` for the base model and each stage, then `report` over all of them."""
    made = [Step(f"eval-{name}", version=1, upstream=evaluation.eval_upstream(model_step),
                 build=evaluation.build_eval_for(model_step), reads=evaluation.eval_reads, inputs=evaluation.eval_inputs,
                 code=GENERATION_CODE)
            for name, model_step in evaluation.models(recipe).items()]
    # With a control, the report also reads both arms' training and the control's final evaluation
    # (control_report_upstream); a recipe without one keeps its key.
    report = Step("report", version=1,
                  upstream=lambda r: tuple(dict.fromkeys((*evaluation.report_upstream(r), *control_report_upstream(r)))),
                  build=evaluation.build_report,
                  reads=lambda r: {"models": list(evaluation.models(r)), "bootstrap_samples": r.eval.bootstrap_samples,
                                   "seed": r.seed, **({"control": r.control} if r.control else {})})
    return [*made, report]


def checkpoint_eval_step(checkpoint: Path, name: str) -> Step:
    """`eval-checkpoint`: score a checkpoint folder from anywhere, keyed by its content (never its path)."""
    digest = evaluation.checkpoint_digest(checkpoint)
    return Step("eval-checkpoint", version=1, upstream=evaluation.eval_upstream(None),
                build=evaluation.build_checkpoint_eval(checkpoint, name, digest),
                reads=lambda r: {**evaluation.eval_reads(r), "name": name}, code=GENERATION_CODE,
                inputs=lambda r: {"checkpoint": digest, **evaluation.eval_inputs(r)})


def own_steps(recipe: Recipe) -> dict[str, Step]:
    """The recipe's own steps (without its control's), in run order."""
    return {step.name: step for step in [*DATA_STEPS, TOKENIZER, BASE_MODEL, *curriculum_steps(recipe), *eval_steps(recipe)]}


# -- the answers-only control (recipe `control:`) -------------------------------------------
# The control's steps are the control recipe's own steps, keyed, built and stored under their own names
# (`orca run --recipe <control>` finds them); in this DAG they are the nodes `control/<step>`. A control
# step with the same key as this recipe's step of that name (sources, tokenizer, the first stage, ...)
# is that step: it gets no node of its own.
CONTROL = curriculum.CONTROL


def runs_as(step: Step, recipe: Recipe) -> tuple[Step, Recipe]:
    """The step and recipe a DAG node is keyed, built and stored as: a control node's are its control's."""
    return _under_control(step.name, recipe) if step.name.startswith(CONTROL) else (step, recipe)


def _under_control(node: str, recipe: Recipe) -> tuple[Step, Recipe]:
    control = curriculum.control_of(recipe)
    if control is None:
        raise ValueError(f"step {node}: recipe {recipe.name} has no control")
    return own_steps(control)[artifact_name(node)], control


def artifact_name(node: str) -> str:
    """The store folder of a DAG node's artifact: `control/train-orca1` is the control's `train-orca1`."""
    return node.removeprefix(CONTROL)


def _node(name: str, recipe: Recipe) -> Step:
    """The Step behind a node name of this recipe's DAG, control nodes included."""
    if not name.startswith(CONTROL):
        return own_steps(recipe)[name]
    return dataclasses.replace(_under_control(name, recipe)[0], name=name)


def control_report_upstream(recipe: Recipe) -> tuple[str, ...]:
    """What the report reads of the two arms for "explanations beat answers": every stage's training
    (tokens and steps) in both, and the control's final stage's evaluation."""
    if recipe.control is None:
        return ()
    stages = [s.name for s in recipe.curriculum.stages]
    return (*(f"train-{s}" for s in stages), f"eval-{stages[-1]}", *(f"{CONTROL}train-{s}" for s in stages),
            f"{CONTROL}eval-{stages[-1]}")


def control_steps(recipe: Recipe, own: dict[str, Step]) -> list[Step]:
    """The control's nodes: the control steps the report reads and their upstream, less those it shares."""
    control = curriculum.control_of(recipe)
    if control is None:
        return []
    theirs = own_steps(control)
    wanted: set[str] = set()
    pending = [artifact_name(n) for n in control_report_upstream(recipe) if n.startswith(CONTROL)]
    while pending:  # the control's steps the report reaches
        name = pending.pop()
        if name not in wanted:
            wanted.add(name)
            pending.extend(theirs[name].upstream_of(control))
    ours_keys, their_keys = {}, {}
    shared = {name for name in wanted if name in own
              and step_key(components(own[name], recipe, ours_keys)) == step_key(components(theirs[name], control, their_keys))}
    return [dataclasses.replace(step, name=CONTROL + name) for name, step in theirs.items()
            if name in wanted and name not in shared]


def steps_for(recipe: Recipe) -> dict[str, Step]:
    """Every node of the recipe's DAG, in run order: its own steps, then its control's, then the report."""
    own = own_steps(recipe)
    report = own.pop("report")
    return {**own, **{step.name: step for step in control_steps(recipe, own)}, "report": report}


def dag_upstream(step: Step, recipe: Recipe, nodes: dict[str, Step]) -> tuple[str, ...]:
    """The nodes a node waits for: its upstream, a control step shared with this recipe as that step.

    Scheduling only, never in a key: a control stage trains after this recipe's last stage, so two
    trainings never ask Ray for the same CPUs at once.
    """
    inner, under = runs_as(step, recipe)
    names = inner.upstream_of(under)  # a control node's: names in its control's DAG
    prefix = CONTROL if step.name.startswith(CONTROL) else ""
    found = []
    for name in names:
        node = name if name.startswith(CONTROL) else prefix + name
        found.append(node if node in nodes else artifact_name(node))
    if step.name.startswith(f"{CONTROL}train-"):
        found.append(f"train-{recipe.curriculum.stages[-1].name}")
    return tuple(dict.fromkeys(found))


# -- keys ------------------------------------------------------------------------
def components(step: Step, recipe: Recipe, _keys: dict[str, str] | None = None) -> dict[str, Any]:
    """key.json of `step` under `recipe` (upstream keys computed recursively); a control node's is its control's.

    Each upstream key is computed once per call: a key's inputs may hash large files (a FLAN dump),
    and every downstream step reaches `sources` through many paths.
    """
    if step.name.startswith(CONTROL):
        inner, control = runs_as(step, recipe)
        return components(inner, control)
    keys = {} if _keys is None else _keys
    upstream = {}
    for name in step.upstream_of(recipe):
        if name not in keys:
            keys[name] = step_key(components(_node(name, recipe), recipe, keys))
        upstream[name] = keys[name]
    return key_components(step.name, step.version, step.reads(recipe), upstream, step.inputs(recipe),
                          code_components(step.code_entries(recipe)))


def plan_key(step: Step, recipe: Recipe) -> str:
    return step_key(components(step, recipe))


@dataclass(frozen=True)
class StepResult:
    ref: ArtifactRef
    cached: bool
    seconds: float
    rows: dict[str, int]


def upstream_digests(store: ArtifactStore, comps: dict[str, Any],
                     lookup: Callable[[str, str], ArtifactRef | None] | None = None) -> dict[str, str]:
    """Content digest (files and their sha256) of each upstream artifact as published now ("" if missing).

    `lookup`: how to find a verified artifact (default `store.lookup`; `orca plan` passes a read-only one).
    """
    digests = {}
    for name, key in comps["upstream"].items():
        ref = (lookup or store.lookup)(artifact_name(name), key)
        digests[name] = sha256_text(canonical_json(store.manifest(ref)["files"])) if ref else ""
    return digests


def has_failures(store: ArtifactStore, ref: ArtifactRef) -> bool:
    """Did a fan-out step's artifact keep failure rows (what --retry-failed resends)?"""
    stats = store.manifest(ref)["stats"]
    return bool(stats.get("failures") or stats.get("fanout", {}).get("failures"))


def verified(store: ArtifactStore, step: Step, comps: dict[str, Any]) -> ArtifactRef | None:
    """The step's artifact if it verifies AND was built from the upstream artifacts published now.

    An upstream republished under the same key (e.g. traces after --retry-failed) makes its
    downstream artifacts stale: they are moved aside and rebuilt.
    """
    key = step_key(comps)
    ref = store.lookup(step.name, key)
    if ref is None or not comps["upstream"]:
        return ref
    built_from = store.manifest(ref)["stats"].get("built_from", {})
    if built_from != upstream_digests(store, comps):
        log.warning("artifact %s/%s was built from older upstream artifacts; rebuilding", step.name, key[:12])
        store.supersede(step.name, key)
        return None
    return ref


def run_step(store: ArtifactStore, step: Step, recipe: Recipe, comps: dict[str, Any] | None = None,
             ctx: StepContext | None = None, force: bool = False) -> StepResult:
    """The step's artifact: the verified one in the store, else built and published now.

    `force` rebuilds even a verified artifact (the old one is kept under `.superseded/`).
    """
    step, recipe = runs_as(step, recipe)
    started = time.perf_counter()
    ctx = ctx or StepContext()
    comps = comps or components(step, recipe)
    key = step_key(comps)
    if not force and (ref := verified(store, step, comps)) is not None:
        return StepResult(ref, True, time.perf_counter() - started, store.manifest(ref)["rows"])
    with store.lock(step.name, key):  # one builder per artifact, however many runs want it
        ref = verified(store, step, comps)  # built by another run while this one waited?
        if ref is not None and force:
            store.supersede(step.name, key)
            ref = None
        if ref is not None:
            return StepResult(ref, True, time.perf_counter() - started, store.manifest(ref)["rows"])
        return _build(store, step, recipe, comps, ctx, key, started)


def _build(store: ArtifactStore, step: Step, recipe: Recipe, comps: dict[str, Any], ctx: StepContext, key: str,
           started: float) -> StepResult:
    upstream_dirs = {}
    for name, upstream_key in comps["upstream"].items():
        upstream_ref = store.lookup(artifact_name(name), upstream_key)
        if upstream_ref is None:
            raise RuntimeError(f"step {step.name}: upstream {name}/{upstream_key[:12]} is not in the store; run it first")
        upstream_dirs[name] = store.local_dir(upstream_ref)
    built_from = upstream_digests(store, comps)
    log.info("building %s/%s", step.name, key[:12])
    if ctx.work_root is not None:  # a folder that outlives staging (training checkpoints)
        ctx = dataclasses.replace(ctx, work_dir=ctx.work_root / step.name / key)
    with store.staging(step.name, key) as staged:
        rows, stats = step.build(recipe, upstream_dirs, staged, ctx)
        if built_from:
            stats = {**stats, "built_from": built_from}
        stats = {**stats, "provenance": provenance(store, recipe)}
        ref = store.publish(step.name, key, comps, staged, rows=rows, stats=stats)
    if ctx.work_dir is not None:  # published: the resume state is no longer needed
        shutil.rmtree(ctx.work_dir, ignore_errors=True)
    return StepResult(ref, False, time.perf_counter() - started, rows)


# -- explain ---------------------------------------------------------------------
@dataclass(frozen=True)
class Explanation:
    step: str
    key: str
    status: str  # "hit", "miss", or "corrupt: <reason>"
    nearest: str | None = None  # key of the closest existing artifact of this step
    differences: list[tuple[str, Any, Any]] = field(default_factory=list)  # (field, theirs, ours)

    def render(self) -> str:
        lines = [f"step {self.step}: key {self.key[:16]}"]
        if self.status == "hit":
            lines.append("HIT: a verified artifact with this key is in the store; the step will be Cached.")
            return "\n".join(lines)
        if self.status.startswith("corrupt"):
            lines.append(f"MISS: the artifact with this key is {self.status}; it will be rebuilt.")
            return "\n".join(lines)
        if self.nearest is None:
            lines.append("MISS: no artifact of this step exists in the store yet.")
            return "\n".join(lines)
        lines.append(f"MISS: nearest existing artifact {self.nearest[:16]} differs in {len(self.differences)} field(s):")
        if self.changed_code:
            lines.append(f"  code changed: {', '.join(self.changed_code)}")
        lines += [f"  library changed: {path.removeprefix('code.libraries.')} {old} -> {new}"
                  for path, old, new in self.differences if path.startswith("code.libraries.")]
        lines += [f"  {path}: {old!r} -> {new!r}" for path, old, new in self.differences if not path.startswith("code.")]
        return "\n".join(lines)

    @property
    def changed_code(self) -> list[str]:
        """The modules whose code differs from the nearest artifact's ("orca_core/filters.py", ...)."""
        return [path.removeprefix("code.modules.") for path, _, _ in self.differences if path.startswith("code.modules.")]


def explain(store: ArtifactStore, step: Step, recipe: Recipe) -> Explanation:
    """Would `step` hit the cache, and if not, which key components differ from the nearest artifact."""
    step, recipe = runs_as(step, recipe)
    comps = components(step, recipe)
    key = step_key(comps)
    status = store.check(step.name, key)
    if status == "ok":
        return Explanation(step.name, key, "hit")
    if status != "absent":
        return Explanation(step.name, key, status)
    best: tuple[int, str, list] | None = None
    for other in store.keys(step.name):
        diffs = diff_components(store.read_json(step.name, other, "key.json"), comps)
        if best is None or len(diffs) < best[0]:
            best = (len(diffs), other, diffs)
    if best is None:
        return Explanation(step.name, key, "miss")
    return Explanation(step.name, key, "miss", best[1], best[2])
