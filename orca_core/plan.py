"""`orca plan`: what a run will cost before it spends anything.

For every step of the recipe's DAG: its key, whether it will hit (a verified
artifact built from the upstream artifacts published now: what `run_step`
checks, read-only here) and, for a miss, the work it will do:

- fan-out steps: teacher requests net of the request cache, per role, with
  prompt tokens (`teacher/tokens.py`), completion tokens (the mean of the
  endpoint's answers already in the cache, else `max_tokens`: an upper bound),
  dollars at the endpoint's prices and hours at its rate limits. A request
  several jobs share (one model in both roles) counts once, as the fan-out
  sends it once. The jobs are the fan-out's own (`generate.*_fanout`) when the
  upstream artifacts exist; otherwise the counts come from the recipe and the
  line says "estimated";
- `train-<stage>`: optimizer steps and tokens (`schedule.optimizer_steps`);
- `eval-<model>`: prompts per checkpoint (`eval.evaluate.plan_jobs`).

The plan reads the store (a path or an s3:// URL) and never writes to it: no
request is sent, nothing is built, the request cache is not compacted, and a
corrupt artifact is reported, not moved aside.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from orca_core.keys import step_key
from orca_core.plan_teachers import ESTIMATED, TeacherWork, fanout_work
from orca_core.recipe.load import recipe_hash
from orca_core.recipe.models import Recipe
from orca_core.schedule import optimizer_steps
from orca_core.sources import TRAIN_FILE
from orca_core.steps import (Explanation, Step, artifact_name, components, explain, runs_as, steps_for,
                             upstream_digests)
from orca_core.store import ArtifactRef, ArtifactStore
from orca_core.traces import RequestCache



@dataclass
class TrainWork:
    optimizer_steps: int
    tokens: int
    rows_per_step: int  # micro_batch_size x grad_accum x workers
    basis: str


@dataclass
class EvalWork:
    prompts: int  # per checkpoint: benchmarks x system messages x limit
    basis: str


@dataclass
class StepPlan:
    step: str
    key: str
    status: str  # hit | miss
    why: str
    teachers: list[TeacherWork] = field(default_factory=list)
    training: TrainWork | None = None
    evaluation: EvalWork | None = None


@dataclass
class Plan:
    recipe: str
    recipe_hash: str
    store: str
    steps: list[StepPlan]
    max_cost_usd: float | None

    @property
    def teachers(self) -> list[TeacherWork]:
        return [t for s in self.steps for t in s.teachers]

    @property
    def requests(self) -> int:
        return sum(t.requests for t in self.teachers)

    @property
    def usd(self) -> float:
        return sum(t.usd for t in self.teachers)

    @property
    def teacher_hours(self) -> float:
        """Fan-out steps run one after another; the roles of one step share its time."""
        return sum(max((t.hours for t in s.teachers), default=0.0) for s in self.steps)

    @property
    def over_budget(self) -> bool:
        return self.max_cost_usd is not None and self.usd > self.max_cost_usd

    def budget_message(self) -> str:
        return (f"the plan's teacher requests cost ${self.usd:,.2f}, over teachers.max_cost_usd = "
                f"${self.max_cost_usd:,.2f}: raise it, or change the recipe")

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "totals": {
            "misses": sum(s.status == "miss" for s in self.steps), "requests": self.requests,
            "usd": round(self.usd, 6), "teacher_hours": round(self.teacher_hours, 4), "over_budget": self.over_budget}}


# -- read-only status -----------------------------------------------------------------
class ReadOnlyChecks:
    """`store.check` once per artifact; unlike `store.lookup` it never moves a corrupt artifact aside."""

    def __init__(self, store: ArtifactStore):
        self.store, self.seen = store, {}

    def status(self, step: str, key: str) -> str:
        if (step, key) not in self.seen:
            self.seen[(step, key)] = self.store.check(step, key)
        return self.seen[(step, key)]

    def lookup(self, step: str, key: str) -> ArtifactRef | None:
        return self.store.ref(step, key) if self.status(step, key) == "ok" else None

    def local_dir(self, step: str, key: str) -> Path | None:
        ref = self.lookup(step, key)
        return self.store.local_dir(ref) if ref else None


def reason(explanation: Explanation) -> str:
    """Why a step hits or misses, in a few words (what `orca explain` says in full)."""
    if explanation.status == "hit":
        return "verified artifact with this key"
    if explanation.status.startswith("corrupt"):
        return f"artifact {explanation.status}: rebuilt"
    if explanation.nearest is None:
        return "no artifact yet"
    changed = [path.removeprefix("config.") for path, _, _ in explanation.differences]
    more = f" +{len(changed) - 2} more" if len(changed) > 2 else ""
    return "changed: " + ", ".join(changed[:2]) + more


def step_status(store: ArtifactStore, checks: ReadOnlyChecks, step: Step, comps: dict[str, Any],
                recipe: Recipe) -> tuple[str, str]:
    """(hit | miss, why), as `run_step` will decide: verified, and built from the upstream artifacts there now."""
    key, stored = step_key(comps), artifact_name(step.name)  # a control node's artifact: its control's step
    status = checks.status(stored, key)
    if status == "ok":
        built_from = store.manifest(store.ref(stored, key))["stats"].get("built_from", {})
        now = upstream_digests(store, comps, checks.lookup)  # an upstream still to build ("") may rebuild the same
        if any(digest and built_from.get(name) != digest for name, digest in now.items()):
            return "miss", "built from older upstream artifacts: rebuilt"
        return "hit", "verified artifact with this key"
    return "miss", reason(explain(store, step, recipe))


# -- the plan ----------------------------------------------------------------------------
def make_plan(recipe: Recipe, names: list[str] | None = None) -> Plan:
    """The plan of the named steps (default: the whole DAG), from the recipe and the store as they are now."""
    store = ArtifactStore(recipe.store.root, verify=recipe.store.verify)
    checks = ReadOnlyChecks(store)
    known = steps_for(recipe)
    keys: dict[str, str] = {}
    comps = {name: components(step, recipe, keys) for name, step in known.items()}
    keys.update({name: step_key(c) for name, c in comps.items()})
    # The artifacts the work of a miss is counted from (datasets: in train_work).
    built = {name: checks.local_dir(name, keys[name]) for name in ("sources", "strategies", "tokenizer")}
    rows = SourceRows(recipe, built["sources"])
    eval_prompts: EvalWork | None = None
    planned = []
    # The request cache on any store (a path or s3:// URL), looked up through its local index; no compaction,
    # so the plan never rewrites the store's shards.
    with contextlib.closing(RequestCache(store.url("requests"), compact=False)) as cache:
        cache.refresh()
        for name in names or list(known):
            status, why = step_status(store, checks, known[name], comps[name], recipe)
            plan = StepPlan(name, keys[name], status, why)
            step, under = runs_as(known[name], recipe)  # a control node counts as its control's step
            if status == "miss":
                if name in ("strategies", "traces-orca1", "traces-orca2"):
                    plan.teachers = fanout_work(name, recipe, built, cache, rows.estimated_groups())
                elif step.name.startswith("train-"):  # its dataset's key: in its own key's upstream
                    plan.training = train_work(under, step.name.removeprefix("train-"), store, checks,
                                               comps[name]["upstream"], rows)
                elif step.name.startswith("eval-"):
                    eval_prompts = eval_prompts or eval_work(recipe, built["sources"])
                    plan.evaluation = eval_prompts
            planned.append(plan)
    return Plan(recipe.name, recipe_hash(recipe), store.url(), planned, recipe.teachers.max_cost_usd)


def _families(recipe: Recipe) -> list[str]:
    from orca_core.sources.suite import SUITE

    return recipe.sources.procedural.families or list(SUITE)


class SourceRows:
    """Training rows per sub-collection: the sources artifact's if built, else what the recipe asks for."""

    def __init__(self, recipe: Recipe, sources: Path | None):
        self.recipe, self.sources = recipe, sources

    def estimated_groups(self) -> list[tuple[str, str, int]] | None:
        """(task, sub-collection, rows) from the recipe; None when the sources artifact exists (no estimate needed)."""
        if self.sources is not None:
            return None
        cfg, groups = self.recipe.sources, []
        if cfg.procedural:
            from orca_core.sources.suite import SUITE

            for family in _families(self.recipe):
                groups.append((family, SUITE[family].sub_collection, cfg.procedural.train_per_family))
        if cfg.flan:  # FLAN's tasks are known only once sampled; a null count (all of it) is not known at all
            groups += [(f"flan/{sub}", sub, n) for sub, n in cfg.flan.counts.items() if n]
        return groups

    def by_sub_collection(self) -> dict[str, int]:
        if self.sources is None:
            counts: dict[str, int] = {}
            for _, sub, n in self.estimated_groups() or []:
                counts[sub] = counts.get(sub, 0) + n
            return counts
        return dict(Counter(pq.read_table(self.sources / TRAIN_FILE, columns=["sub_collection"])["sub_collection"].to_pylist()))


def _examples_upper_bound(recipe: Recipe, stage_name: str, rows: SourceRows) -> int:
    """A stage's examples at most: every source row answered and kept (dialog rows get no Orca 1 trace)."""
    stage = next(s for s in recipe.curriculum.stages if s.name == stage_name)
    counts = rows.by_sub_collection()
    total = sum(counts.values())
    if stage.data == "flan":
        return total
    if stage.data == "orca1":
        return total - counts.get("dialog", 0)
    return round(total * (1 + stage.orca1_replay_ratio))


def train_work(recipe: Recipe, stage_name: str, store: ArtifactStore, checks: ReadOnlyChecks, keys: dict[str, str],
               rows: SourceRows) -> TrainWork:
    stage = next(s for s in recipe.curriculum.stages if s.name == stage_name)
    t = recipe.train
    per_step = t.micro_batch_size * t.grad_accum * t.workers
    dataset = checks.lookup(f"dataset-{stage_name}", keys[f"dataset-{stage_name}"])
    if dataset is not None:
        manifest = store.manifest(dataset)
        n_rows, tokens = manifest["rows"]["rows"], manifest["stats"]["tokens"]
        steps = optimizer_steps(n_rows, per_step, stage.epochs or 1, stage.steps)
        return TrainWork(steps, round(steps * per_step * tokens / n_rows) if n_rows else 0, per_step,
                         f"dataset manifest: {n_rows} packed rows, {tokens} tokens")
    examples = _examples_upper_bound(recipe, stage_name, rows)
    steps = optimizer_steps(examples, per_step, stage.epochs or 1, stage.steps)
    what = "dataset not built yet" + ("" if rows.sources is not None else "; sources not built yet")
    return TrainWork(steps, steps * per_step * t.max_len, per_step,
                     f"upper bound ({what}): {examples} examples, one per row of max_len {t.max_len} tokens")


def eval_work(recipe: Recipe, sources: Path | None) -> EvalWork:
    """Prompts per checkpoint: the evaluation's own job list (every benchmark x system message, cut to limit)."""
    from orca_core.eval.evaluate import plan_jobs
    from orca_core.eval.specs import benchmark_specs

    messages, limit, prompts = list(recipe.eval.system_messages), recipe.eval.limit, 0
    estimated = False
    for spec in benchmark_specs(recipe):
        if spec.name == "procedural-heldout" and sources is None:
            estimated = True
            procedural = recipe.sources.procedural
            if procedural:  # the held-out split: heldout_per_family rows of each family, cut to the limit
                per_task = min(procedural.heldout_per_family, spec.limit or limit or procedural.heldout_per_family)
                prompts += len(_families(recipe)) * per_task * len(messages)
            continue
        # The native system message's text does not change how many prompts there are.
        jobs = plan_jobs([spec], messages, sources_dir=sources, limit=limit, native=lambda example: "")
        prompts += sum(len(job.examples) for job in jobs)
    return EvalWork(prompts, ESTIMATED if estimated else "benchmarks x system messages x limit")


# -- rendering ------------------------------------------------------------------------------
def work_text(step: StepPlan) -> str:
    if step.status == "hit":
        return ""
    if step.teachers:
        return "; ".join(f"{t.role}: {t.requests:,} requests, ${t.usd:,.2f}" for t in step.teachers)
    if step.training:
        return f"{step.training.optimizer_steps:,} optimizer steps, {step.training.tokens:,} tokens"
    if step.evaluation:
        return f"{step.evaluation.prompts:,} eval prompts"
    return "build"


def markdown(plan: Plan) -> str:
    """The plan as a markdown page (the dry-run's Prefect artifact)."""
    lines = [f"# Plan: recipe {plan.recipe} ({plan.recipe_hash[:12]}), store `{plan.store}`", "",
             "| step | plan | why | key | work |", "|---|---|---|---|---|"]
    lines += [f"| {s.step} | {s.status.upper()} | {s.why} | `{s.key[:12]}` | {work_text(s)} |" for s in plan.steps]
    if plan.teachers:
        lines += ["", "| step | role | model | requests | cached | prompt tokens | completion tokens | $ | hours | note |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {t.step} | {t.role} | {t.model} | {t.requests:,} | {t.cached:,}"
                  f"{f' (+{t.shared:,} shared)' if t.shared else ''} | {t.prompt_tokens:,} "
                  f"({t.prompt_basis}) | {t.completion_tokens:,} ({t.completion_basis}) | {t.usd:,.4f} | "
                  f"{t.hours:.3f} | {t.note} |" for t in plan.teachers]
    lines += ["", f"**Total:** {sum(s.status == 'miss' for s in plan.steps)} of {len(plan.steps)} steps to run, "
              f"{plan.requests:,} teacher requests, ${plan.usd:,.2f}, {plan.teacher_hours:.2f} h of teacher time."]
    if plan.over_budget:
        lines.append(f"\n**Over budget:** {plan.budget_message()}.")
    return "\n".join(lines)
