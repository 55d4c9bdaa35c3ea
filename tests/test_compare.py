"""`orca compare`: recipes' final stages set against the first by the paired difference on the items both answered."""

from __future__ import annotations

import pandas as pd
from typer.testing import CliRunner

from flows.cli import app
from orca_core.eval.evaluate import EXAMPLES_FILE, SUMMARY_FILE
from orca_core.eval.metrics import summarize
from orca_core.recipe import load_recipe
from orca_core.steps import plan_key, steps_for
from orca_core.store import ArtifactStore

runner = CliRunner()


def _answers(right_of_5: int, drop: int = 0) -> pd.DataFrame:
    """The final stage's per-example results: 8 tasks x 5 items, the first `right_of_5` right; the last `drop` items missing."""
    rows = [{"benchmark": "procedural-heldout", "task": f"task{t}", "id": f"{t}-{i}", "system_message": "empty",
             "prompt": "q", "output": "o", "strict": None, "flexible": None, "gold": "a", "correct_strict": i < right_of_5,
             "correct_flexible": i < right_of_5, "format_ok": True, "finish_reason": "stop", "output_tokens": 3}
            for t in range(8) for i in range(5)]
    return pd.DataFrame(rows[:len(rows) - drop])


def _publish_run(recipe, examples: pd.DataFrame) -> None:
    """What `orca run` leaves in the store for compare to read: the report's summary and the final stage's examples."""
    store = ArtifactStore(recipe.store.root)
    stage = recipe.curriculum.stages[-1].name
    summary = summarize(examples, samples=200, seed=0)
    for step, name, frame in (("report", SUMMARY_FILE, summary.assign(model=stage)),
                              (f"eval-{stage}", EXAMPLES_FILE, examples)):
        key = plan_key(steps_for(recipe)[step], recipe)
        with store.staging(step, key) as staged:
            frame.to_parquet(staged / name, index=False)
            store.publish(step, key, {"step": step}, staged)


def test_compare_gives_the_paired_difference_on_the_shared_items_and_warns_about_the_rest(tmp_path):
    store = tmp_path / "store"
    control = tmp_path / "smoke-answers.yaml"
    control.write_text("extends: smoke\nname: smoke-answers\nseed: 1\n")  # another run: other keys, same items
    store_set = ["--set", f"store.root={store}"]
    missing = runner.invoke(app, ["compare", "smoke", str(control), *store_set])
    assert missing.exit_code == 1 and "recipe smoke has no report, eval-orca2 in" in missing.output

    _publish_run(load_recipe("smoke", [f"store.root={store}"]), _answers(3))
    _publish_run(load_recipe(str(control), [f"store.root={store}"]), _answers(1, drop=2))
    result = runner.invoke(app, ["compare", "smoke", str(control), *store_set])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    first = next(line for line in lines if "│ smoke " in line)
    control_row = next(line for line in lines if "│ smoke-answers " in line)
    assert "60.0 [" in first and "│ 40 " in first
    # 38 shared items: smoke right on 3 of 5 per task, the control on 1: -40 points per task, but -66.7 on
    # the last one's 3 shared items; the macro is their mean, -43.3. Golden CI, seed 0.
    assert "│ 21.7 [10.0–35.8] │ 38 " in control_row and "│ -43.3 [-58.3, -28.3] " in control_row
    assert control_row.rstrip(" │").endswith("below")
    assert ("warning: smoke-answers vs smoke: paired on the 38 items both answered; 0 only in smoke-answers, "
            "2 only in smoke (left out)") in " ".join(result.output.split())
