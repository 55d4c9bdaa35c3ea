"""`orca`: the command line.

    orca run --recipe tiny [--set sources.seed=1]   run the pipeline flow
    orca recipe show tiny [--set ...]               print the resolved recipe
    orca eval CHECKPOINT --set eval.suite=real-offline  score a checkpoint folder, write a report
    orca explain sources --recipe tiny [--set ...]  would the step hit the cache? if not, why
    orca plan --recipe tiny [--set ...] [--json]    every step's hit or miss, and what the misses cost
    orca store ls --recipe tiny                     the artifacts in the store
    orca lineage runs/report/<key>                  what an artifact was built from, down to the sources
    orca compare tiny tiny-answers-only             final stages of recipes already run: paired difference, 95% CI
    orca teacher serve --recipe tiny --port 8000    the oracle teacher, OpenAI-compatible
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from orca_core.recipe import RecipeError, load_recipe, recipe_hash, recipe_yaml
from orca_core.recipe.models import OracleSettings
from orca_core.steps import artifact_name, explain, plan_key, steps_for
from orca_core.store import ArtifactStore

app = typer.Typer(no_args_is_help=True, add_completion=False, help="orca-pipeline: teach small models to reason, Orca-style.")
recipe_app = typer.Typer(no_args_is_help=True, help="Inspect recipes.")
store_app = typer.Typer(no_args_is_help=True, help="Inspect the artifact store.")
teacher_app = typer.Typer(no_args_is_help=True, help="The built-in oracle teacher.")
app.add_typer(recipe_app, name="recipe")
app.add_typer(store_app, name="store")
app.add_typer(teacher_app, name="teacher")
console = Console(width=None if sys.stdout.isatty() else 150)  # logs and CI: wide enough for the tables

RecipeOpt = Annotated[str, typer.Option("--recipe", "-r", help="Recipe name in configs/ or a YAML path.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a field: train.lr=1e-4 (repeatable).")]


def _load(recipe: str, overrides: list[str] | None):
    try:
        return load_recipe(recipe, overrides or [])
    except RecipeError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@app.command()
def run(recipe: RecipeOpt = "tiny", set_: SetOpt = None,
        retry_failed: bool = typer.Option(False, "--retry-failed", help="Re-send teacher requests that ended as failure rows."),
        only: str = typer.Option(None, "--only", help="Run one part: generate, train or evaluate.")) -> None:
    """Run the pipeline flow on a recipe; print what ran, what was Cached and why, the scores and the report."""
    resolved = _load(recipe, set_)  # fail on a bad recipe before Prefect starts
    from flows import pipeline

    flows = {None: pipeline.orca_pipeline, "generate": pipeline.orca_generate, "train": pipeline.orca_train,
             "evaluate": pipeline.orca_evaluate}
    if only not in flows:
        console.print(f"[red]error:[/red] --only {only!r}: choose generate, train or evaluate")
        raise typer.Exit(2)
    kwargs = {"retry_failed": retry_failed} if only in (None, "generate") else {}
    refusal = pipeline.budget_refusal(resolved, list(steps_for(resolved)) if only is None else pipeline.parts(resolved)[only])
    if refusal is not None:  # the flow refuses too (a dashboard run); here before Prefect starts
        console.print(f"[red]refused: {refusal}[/red] (`orca plan` itemizes it)", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    from tasks.step import NOT_RETRIED

    try:
        outcomes = flows[only](recipe=recipe, overrides=set_ or [], **kwargs)
    except NOT_RETRIED as err:  # a refused key, an unknown model: the message says which endpoint and variable
        console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    table = Table(title=f"orca-pipeline: recipe {resolved.name} ({recipe_hash(resolved)[:12]})")
    for column in ("step", "state", "why", "key", "rows", "start", "end", "seconds"):
        table.add_column(column)
    for o in outcomes:
        state = f"[green]{o['state']}[/green]" if o["state"] == "Cached" else o["state"]
        rows = ", ".join(f"{k}={v}" for k, v in o["rows"].items())
        table.add_row(o["step"], state, o["why"], o["key"][:12], rows, f"{o['start']:.1f}", f"{o['end']:.1f}",
                      f"{o['seconds']:.1f}")
    console.print(table)
    from tasks.report import timeline  # steps overlap along the DAG: when each ran

    console.print(timeline(outcomes, max(o["end"] for o in outcomes)), highlight=False, soft_wrap=True)
    cached = sum(o["state"] == "Cached" for o in outcomes)
    console.print(f"{cached} of {len(outcomes)} steps Cached, {len(outcomes) - cached} ran; "
                  f"artifacts in {resolved.store.root}")
    report = next((o for o in outcomes if o["step"] == "report"), None)
    if report is not None:
        from orca_core.eval.steps import ordered_table

        stats = ArtifactStore(resolved.store.root).read_json("report", report["key"], "manifest.json")["stats"]
        _print_table(ordered_table(stats), "zero-shot accuracy, flexible extraction [95% CI]")
        _print_findings(stats.get("findings") or {})
        console.print(f"report: {report['artifact']}/report.md (and report.html, findings.png, accuracy.png, "
                      "loss.png)", highlight=False, soft_wrap=True)


def _print_findings(found: dict) -> None:
    """A report's findings: the stage ordering, explanations vs the answers-only control, strategy per family,
    each with its table, then one line per finding: holds or not."""
    from orca_core.eval import findings

    rows = found.get("curriculum") or []
    if rows:
        header, body = findings.curriculum_table(rows)
        _print_table([dict(zip(header, row)) for row in body],
                     f"finding 1, each stage vs the last: macro accuracy, {found['headline_system_message']} system "
                     f"message (seed {found['seed']}, recipe {found['recipe_hash'][:12]})")
        if len(rows) > 1:
            header, body = findings.by_task_table(rows)
            _print_table([dict(zip(header, row)) for row in body], "finding 1 per task family: paired difference, pts [95% CI]")
    control = found.get("control")
    if control:
        header, body = findings.control_table(control)
        _print_table([dict(zip(header, row)) for row in body],
                     f"finding 2, explanations vs answers only: {control['main']} - {control['control']}, paired")
        header, body = findings.budget_table(control["budget"])
        _print_table([dict(zip(header, row)) for row in body], "finding 2: the training each arm saw")
    usage = found.get("strategy_usage")
    if usage:
        console.print(f"finding 3, strategy per family ({usage['model']}, {usage['system_message']} system message): "
                      f"{100 * (usage['follows'] or 0):.1f}% of {usage['n']} answers follow the teacher's strategy "
                      f"for their family; {usage['student_strategies']} strategies across {usage['families']} "
                      "families", highlight=False, soft_wrap=True)
    for v in found.get("verdicts") or []:
        console.print(f"finding {v['number']} ({v['finding']}): {v['verdict'].replace('**', '')}", highlight=False, soft_wrap=True)


def _print_table(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for column in rows[0] if rows else []:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)


@app.command("compare")
def compare_cmd(recipes: Annotated[list[str], typer.Argument(help="Two or more recipes (names or YAML paths), each run already.")],
                set_: SetOpt = None) -> None:
    """Compare the final stages of recipes that have run (e.g. tiny vs tiny-answers-only): paired differences, 95% CIs."""
    import pandas as pd

    from orca_core.eval import findings
    from orca_core.eval.evaluate import EXAMPLES_FILE, SUMMARY_FILE

    if len(recipes) < 2:
        console.print("[red]error:[/red] give two or more recipes to compare")
        raise typer.Exit(2)
    rows = []
    for ref in recipes:
        resolved = _load(ref, set_)
        store = ArtifactStore(resolved.store.root, verify=resolved.store.verify)
        stage = resolved.curriculum.stages[-1].name
        found = {step: store.lookup(step, plan_key(steps_for(resolved)[step], resolved)) for step in ("report", f"eval-{stage}")}
        if None in found.values():
            console.print(f"[red]error:[/red] recipe {resolved.name} has no {', '.join(s for s, r in found.items() if r is None)} "
                          f"in {store.url()} yet: run `orca run --recipe {ref}` first", highlight=False, soft_wrap=True)
            raise typer.Exit(1)
        summary = pd.read_parquet(store.local_dir(found["report"]) / SUMMARY_FILE)
        examples = pd.read_parquet(store.local_dir(found[f"eval-{stage}"]) / EXAMPLES_FILE, columns=findings.PAIRED_COLUMNS)
        row = findings.final_stage(summary, stage, resolved.eval.headline_system_message)
        rows.append({**row, "recipe": resolved.name, "hash": recipe_hash(resolved)[:12], "seed": resolved.seed,
                     "system_message": resolved.eval.headline_system_message, "report": found["report"].url,
                     "examples": examples, "samples": resolved.eval.bootstrap_samples})
    first = rows[0]
    table = Table(title="final stages: macro accuracy, flexible extraction [95% CI]; each vs the first, paired on the same items")
    for column in ("recipe", "hash", "seed", "model", "system message", "accuracy", "examples", "vs first, pts [95% CI]", "call"):
        table.add_column(column)
    warnings = []
    for i, r in enumerate(rows):
        step = {} if i == 0 else findings.paired(
            r["examples"], first["examples"], (r["system_message"], first["system_message"]), samples=first["samples"],
            seed=first["seed"], intersect=True, names=(r["recipe"], first["recipe"]))
        table.add_row(r["recipe"], r["hash"], str(r["seed"]), r["model"], r["system_message"],
                      f"{100 * r['accuracy']:.1f} [{100 * r['low']:.1f}–{100 * r['high']:.1f}]", str(r["n"]),
                      findings.difference_cell(step["difference"], step["difference_low"], step["difference_high"])
                      if step else "", step.get("vs", ""))
        if step and (step["only_a"] or step["only_b"]):
            warnings.append(f"{r['recipe']} vs {first['recipe']}: paired on the {step['pairs']} items both answered; "
                            f"{step['only_a']} only in {r['recipe']}, {step['only_b']} only in {first['recipe']} (left out)")
    console.print(table)
    for warning in warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
    if len({r["system_message"] for r in rows}) > 1:
        console.print("[yellow]note:[/yellow] the recipes' headline system messages differ: not like for like")
    for r in rows:
        console.print(f"{r['recipe']}: {r['report']}/report.md", highlight=False, soft_wrap=True)


@app.command("eval")
def eval_cmd(checkpoint: Annotated[str, typer.Argument(help="A checkpoint folder (HF format: config, weights, tokenizer).")],
             recipe: RecipeOpt = "tiny", set_: SetOpt = None,
             name: str = typer.Option(None, help="The model's name in the report (default: the folder's name).")) -> None:
    """Score CHECKPOINT zero-shot on the recipe's eval suite (cached by content, resumed per benchmark)."""
    resolved = _load(recipe, set_)
    from flows.evaluate import orca_evaluate_checkpoint

    result = orca_evaluate_checkpoint(checkpoint=checkpoint, recipe=recipe, overrides=set_ or [], name=name)
    _print_table(result["table"], f"{name or checkpoint}: zero-shot accuracy, flexible [95% CI], {resolved.eval.suite}")
    if result["state"] == "Cached":
        console.print("Cached: this checkpoint was already scored with these settings; nothing generated")
    else:
        console.print(f"{result['state']}: {result['generated']} benchmark result(s) generated, "
                      f"{result['reused']} found in the store (same weights, same settings)")
    console.print(f"report: {result['artifact']}/report.md (and report.html)", highlight=False, soft_wrap=True)


@app.command("serve")
def serve_cmd(port: int = typer.Option(4200, help="Port of the Prefect server (on 127.0.0.1)."),
              recipe: RecipeOpt = "tiny",
              server: bool = typer.Option(True, "--server/--no-server", help="Start a Prefect server (SQLite), or use PREFECT_API_URL's."),
              home: str = typer.Option(".prefect-server", help="The started server's PREFECT_HOME (database, logs).")) -> None:
    """Start a Prefect server and serve the deployments: pipeline, its parts, one-checkpoint eval, nightly eval."""
    from pathlib import Path

    from flows.serve import main

    _load(recipe, None)
    main(port=port, recipe=recipe, start=server, home=Path(home).resolve())


@app.command("nightly")
def nightly_cmd(recipe: RecipeOpt = "tiny", set_: SetOpt = None,
                checkpoint: Annotated[list[str] | None, typer.Option("--checkpoint", help="name=FOLDER (repeatable); default: the newest of each stage in the store.")] = None) -> None:
    """Run the nightly evaluation now (what the nightly-eval deployment runs at 02:00 UTC)."""
    _load(recipe, set_)
    from flows.nightly import nightly_eval

    state = nightly_eval(recipe=recipe, overrides=set_ or [], checkpoints=checkpoint, return_state=True)
    console.print(f"nightly-eval: {state.name}" + (f": {state.message}" if state.message else ""), highlight=False)
    raise typer.Exit(0 if state.is_completed() else 1)


@recipe_app.command("show")
def recipe_show(name: str, set_: SetOpt = None) -> None:
    """Print the resolved recipe (parents merged, overrides applied, defaults filled)."""
    resolved = _load(name, set_)
    console.print(f"# recipe hash {recipe_hash(resolved)}", highlight=False)
    console.print(recipe_yaml(resolved), highlight=False, markup=False)


@app.command("explain")
def explain_cmd(step: str, recipe: RecipeOpt = "tiny", set_: SetOpt = None) -> None:
    """Say whether STEP would hit the cache; if not, which key fields differ from the nearest artifact."""
    resolved = _load(recipe, set_)
    known = steps_for(resolved)
    if step not in known:
        console.print(f"[red]error:[/red] unknown step {step!r}; steps: {', '.join(known)}")
        raise typer.Exit(2)
    store = ArtifactStore(resolved.store.root, verify=resolved.store.verify)
    console.print(explain(store, known[step], resolved).render(), highlight=False, markup=False)


@app.command("plan")
def plan_cmd(recipe: RecipeOpt = "tiny", set_: SetOpt = None,
             only: str = typer.Option(None, "--only", help="Plan one part: generate, train or evaluate."),
             as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON.")) -> None:
    """What a run would do, before it spends: every step's key, hit or miss, and the work of each miss.

    Teacher requests net of the request cache with tokens, dollars and hours; optimizer steps and tokens
    per stage; eval prompts per checkpoint. Sends nothing, builds nothing; exits 1 over teachers.max_cost_usd.
    """
    from orca_core.plan import make_plan, work_text

    resolved = _load(recipe, set_)
    names = None
    if only is not None:
        from flows.pipeline import parts

        if only not in ("generate", "train", "evaluate"):
            console.print(f"[red]error:[/red] --only {only!r}: choose generate, train or evaluate")
            raise typer.Exit(2)
        names = parts(resolved)[only]
    plan = make_plan(resolved, names)
    if as_json:
        print(json.dumps(plan.to_json(), indent=2))
    else:
        table = Table(title=f"plan: recipe {plan.recipe} ({plan.recipe_hash[:12]}), store {plan.store}")
        for column in ("step", "plan", "why", "key", "work"):
            table.add_column(column, overflow="fold")
        for s in plan.steps:
            table.add_row(s.step, "[green]HIT[/green]" if s.status == "hit" else "[yellow]MISS[/yellow]", s.why,
                          s.key[:12], work_text(s))
        console.print(table)
        rows = [{"step": t.step, "role": t.role, "model": t.model, "requests": f"{t.requests:,}", "cached": f"{t.cached:,}",
                 "prompt tokens": f"{t.prompt_tokens:,} ({t.prompt_basis})",
                 "completion tokens": f"{t.completion_tokens:,} ({t.completion_basis})",
                 "$": f"{t.usd:,.4f}", "hours": f"{t.hours:.3f}", "note": t.note} for t in plan.teachers]
        if rows:
            _print_table(rows, "teacher requests to send (net of the request cache)")
        misses = sum(s.status == "miss" for s in plan.steps)
        console.print(f"{misses} of {len(plan.steps)} steps to run; {plan.requests:,} teacher requests, "
                      f"${plan.usd:,.2f}, {plan.teacher_hours:.2f} h of teacher time", highlight=False)
    if plan.over_budget:
        Console(stderr=True).print(f"[red]over budget: {plan.budget_message()}[/red]", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@app.command("lineage")
def lineage_cmd(artifact: Annotated[str, typer.Argument(help="An artifact folder, STEP/KEY, or a key prefix (8+ hex digits).")],
                recipe: RecipeOpt = "tiny", set_: SetOpt = None,
                store_root: str = typer.Option(None, "--store", help="The store (default: the recipe's, or the folder's).")) -> None:
    """Print the chain report -> eval -> checkpoint -> datasets -> traces -> sources behind an artifact."""
    from pathlib import Path

    from orca_core.lineage import find, lineage, render

    folder = Path(artifact).expanduser()
    if store_root is None and folder.is_dir() and (folder / "key.json").is_file():
        store_root = str(folder.resolve().parents[1])
    store = ArtifactStore(store_root or _load(recipe, set_).store.root)
    try:
        step, key = find(store, artifact)
        node = lineage(store, step, key)
    except (ValueError, LookupError) as err:
        console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    for line in render(node):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    recipe_file = node.provenance.get("recipe_file")
    if recipe_file:
        console.print(f"rebuild: orca run --recipe {recipe_file} --set store.root={store.url()}", highlight=False, soft_wrap=True)


@store_app.command("ls")
def store_ls(recipe: RecipeOpt = "tiny", set_: SetOpt = None, as_json: bool = typer.Option(False, "--json")) -> None:
    """List the artifacts in the recipe's store; marks the ones this recipe would use."""
    resolved = _load(recipe, set_)
    store = ArtifactStore(resolved.store.root, verify=resolved.store.verify)
    rows = []
    wanted: dict[str, set[str]] = {}  # store folder -> the keys this recipe uses (a control node's: its control's step)
    for node, step in steps_for(resolved).items():
        wanted.setdefault(artifact_name(node), set()).add(plan_key(step, resolved))
    for name, keys in wanted.items():
        for key in store.keys(name):
            manifest = store.read_json(name, key, "manifest.json")
            rows.append({"step": name, "key": key, "used_by_recipe": key in keys, "rows": manifest["rows"],
                         "created_at": manifest["created_at"], "url": store.url(name, key)})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"store {store.url()}")
    for column in ("step", "key", "recipe", "rows", "created", "url"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(r["step"], r["key"][:12], "*" if r["used_by_recipe"] else "", str(r["rows"]), r["created_at"], r["url"])
    console.print(table)


@teacher_app.command("serve")
def teacher_serve(recipe: RecipeOpt = "tiny", set_: SetOpt = None,
                  sources: Annotated[list[str] | None, typer.Option("--sources", help="Source Parquet files (default: the recipe's sources artifact).")] = None,
                  port: int = typer.Option(8000, help="0 picks a free port."),
                  host: str = typer.Option("127.0.0.1", help="Bind address (keep it on loopback unless you mean it).")) -> None:
    """Serve the recipe's oracle teachers (OpenAI-compatible: chat completions, models, files, batches; /stats)."""
    from orca_core.steps import SOURCES
    from orca_oracle.server import serve

    resolved = _load(recipe, set_)
    models = {e.model: e.oracle or OracleSettings() for e in (resolved.teachers.assistant, resolved.teachers.strong)
              if e.kind == "oracle"}
    if not models:
        console.print("[red]error:[/red] the recipe has no `kind: oracle` teacher")
        raise typer.Exit(2)
    if not sources:
        store = ArtifactStore(resolved.store.root, verify=resolved.store.verify)
        ref = store.lookup("sources", plan_key(SOURCES, resolved))
        if ref is None:
            console.print("[red]error:[/red] no sources artifact for this recipe yet: run `orca run` first, or pass --sources")
            raise typer.Exit(2)
        sources = [ref.file("train.parquet"), ref.file("heldout.parquet")]
    key_env = next((e.api_key_env for e in (resolved.teachers.assistant, resolved.teachers.strong) if e.api_key_env), None)
    serve(host=host, port=port, models=models, sources=sources, api_key=os.environ.get(key_env) if key_env else None)


def main() -> None:
    """The `orca` command: the app, with an unpinnable hub input reported as a one-line error naming the field."""
    from orca_core.hub import HubPinError

    try:
        app()
    except HubPinError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
