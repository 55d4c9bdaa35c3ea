"""The training half of the DAG: tokenizer -> base model -> (dataset, train) per curriculum stage.

Stages come from the recipe (`curriculum.stages`), so their steps are made per
recipe: `dataset-<stage>` (chat-formatted, masked, packed) and `train-<stage>`
(DeepSpeed, from the previous stage's exported weights: `base-model` first).
Each is an ordinary cached step: its key holds the upstream checkpoint key, the
dataset key and the training settings that change the result.

Training resumes: checkpoints go to a work folder outside staging,
`<store>/.train-work/<key>/`, which survives a killed worker or a Prefect retry;
a checkpoint that does not validate is deleted (logged) and training restarts.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from orca_core.context import StepContext
from orca_core.keys import file_sha256, folder_hashes
from orca_core.recipe.models import ModelConfig, Recipe, StageConfig, TokenizerConfig
from orca_core.sources import TRAIN_FILE
from orca_core.traces import TRACES_FILE

log = logging.getLogger(__name__)

DATASET_FILE = "packed.arrow"  # Arrow IPC, uncompressed: training memory-maps it (orca_core/packed.py)
TRAIN_WORK = ".train-work"
TRAINING_STATE = "training_state"
# Training settings that do not change the weights (where and how fast it runs), left out of the key.
# gradient_checkpointing recomputes the same activations in the backward: the weights do not change (tested to 1e-6)
OPERATIONAL = {"use_gpu", "cpus_per_worker", "checkpoint_every", "gradient_checkpointing"}


def traces_needed(stage: StageConfig) -> tuple[str, ...]:
    return {"flan": (), "orca1": ("filtered-orca1",), "orca2": ("filtered-orca1", "filtered-orca2")}[stage.data]


# -- the answers-only control -----------------------------------------------------------
CONTROL = "control/"  # the control's steps in this recipe's DAG: control/train-orca1 (orca_core/steps.py)


def control_of(recipe: Recipe) -> Recipe | None:
    """The recipe's control arm (`control:`), or None: this recipe with each stage's data from the twin recipe.

    Everything else is this recipe's (seed, sources, model, step budgets, eval, and any --set applied to
    it), so the two arms differ in their training targets alone; with a twin that only changes the
    stages' data (configs/tiny-answers-only.yaml) the control's steps have the keys that
    `orca run --recipe <twin>` gives them, and the artifacts are shared.
    """
    if recipe.control is None:
        return None
    from orca_core.recipe.load import load_recipe

    twin = load_recipe(recipe.control)
    ours, theirs = [s.name for s in recipe.curriculum.stages], [s.name for s in twin.curriculum.stages]
    if ours != theirs:
        raise ValueError(f"control: recipe {twin.name}'s stages {theirs} differ from {recipe.name}'s {ours}; "
                         "a control trains the same stages, on other data")
    stages = [stage.model_copy(update={"data": other.data, "orca1_replay_ratio": other.orca1_replay_ratio})
              for stage, other in zip(recipe.curriculum.stages, twin.curriculum.stages)]
    return recipe.model_copy(update={"name": twin.name, "description": twin.description, "control": None,
                                     "curriculum": recipe.curriculum.model_copy(update={"stages": stages})})


# -- tokenizer ------------------------------------------------------------------------
def tokenizer_upstream(recipe: Recipe) -> tuple[str, ...]:
    if recipe.model.tokenizer.kind == "train_bpe":
        return ("sources", "filtered-orca1", "filtered-orca2")  # the corpus it is trained on
    return ()


def _pretrained_source(settings: ModelConfig | TokenizerConfig, cfg: dict[str, Any]) -> dict[str, Any]:
    """A pretrained source in a key: a local (or package) folder by its files' hashes, a hub name by its commit."""
    if cfg.get("gguf_file") is None:
        cfg.pop("gguf_file", None)  # keys of recipes without a GGUF file stay as they were
    if settings.kind == "pretrained":  # what only a random init or a trained BPE reads (a recipe may inherit it)
        for unused in ("architecture", "vocab_size"):
            cfg.pop(unused, None)
    if (location := settings.location()) is not None and Path(location).is_dir():
        cfg["path"] = "<local folder>"  # its files' hashes are the input (pretrained_files)
    elif (commit := settings.hub_commit()) is not None:
        cfg["revision"] = commit  # the commit loaded, not the branch named (orca_core/hub.py)
    return cfg


def pretrained_files(settings: ModelConfig | TokenizerConfig) -> dict[str, str]:
    """sha256 of what a local pretrained source loads: its GGUF file alone, or every file of its folder."""
    location = settings.location()
    if location is None or not Path(location).is_dir():
        return {}  # random init, a trained tokenizer, or a hub name (keyed by its commit)
    if settings.gguf_file is None:
        return folder_hashes(location)
    gguf = Path(location, settings.gguf_file)
    if not gguf.is_file():
        raise FileNotFoundError(f"gguf_file {settings.gguf_file!r}: no such file in {settings.path} ({location})")
    return {settings.gguf_file: file_sha256(gguf)}


def tokenizer_reads(recipe: Recipe) -> dict[str, Any]:
    settings = recipe.model.tokenizer
    # the default pre-tokenizer is left out, so recipes that do not set it keep their keys
    default = ("pre_tokenizer",) if settings.pre_tokenizer == "digits" else ()
    cfg = settings.model_dump(mode="json", exclude={"revision", *default})
    return {"tokenizer": _pretrained_source(settings, cfg)}


def build_tokenizer(recipe: Recipe, upstream: dict[str, Path], out: Path, ctx: StepContext):
    from orca_core import tokenizer

    cfg = recipe.model.tokenizer
    if cfg.kind == "pretrained":
        tok = tokenizer.prepare_pretrained(cfg.location(), out, revision=cfg.hub_commit(), gguf_file=cfg.gguf_file)
    else:
        traces = [pq.read_table(upstream[name] / TRACES_FILE) for name in ("filtered-orca1", "filtered-orca2")]
        corpus = tokenizer.tokenizer_corpus(pq.read_table(upstream["sources"] / TRAIN_FILE), traces)
        tok = tokenizer.train_bpe(corpus, cfg.vocab_size, out, cfg.pre_tokenizer)
    return {"vocab": len(tok)}, {"vocab_size": len(tok), "kind": cfg.kind}


# -- base model -------------------------------------------------------------------------
def base_model_reads(recipe: Recipe) -> dict[str, Any]:
    cfg = recipe.model.model_dump(mode="json", exclude={"tokenizer", "revision"})
    return {"model": _pretrained_source(recipe.model, cfg), "seed": recipe.seed}


def build_base_model(recipe: Recipe, upstream: dict[str, Path], out: Path, ctx: StepContext):
    from orca_core.model import build_base_model as build

    build(recipe.model, upstream["tokenizer"], out, recipe.seed)
    return {"checkpoints": 1}, {"kind": recipe.model.kind}


# -- datasets ------------------------------------------------------------------------------
def build_dataset_for(stage: StageConfig):
    def build(recipe: Recipe, upstream: dict[str, Path], out: Path, ctx: StepContext):
        from transformers import AutoTokenizer

        from orca_core import data

        traces = {name: upstream[name] / TRACES_FILE if name in upstream else None
                  for name in ("filtered-orca1", "filtered-orca2")}
        examples = data.stage_example_batches(stage.data, upstream["sources"] / TRAIN_FILE,  # read in batches
                                              traces["filtered-orca1"], traces["filtered-orca2"],
                                              stage.orca1_replay_ratio, recipe.seed)
        tok = AutoTokenizer.from_pretrained(upstream["tokenizer"], local_files_only=True)
        stats = data.write_dataset(examples, tok, recipe.train.max_len, recipe.train.overlong, recipe.seed,
                                   out / DATASET_FILE)
        return {"rows": stats["rows"], "examples": stats["kept"]}, stats

    return build


# -- training ----------------------------------------------------------------------------------
def train_reads_for(stage: StageConfig):
    def reads(recipe: Recipe) -> dict[str, Any]:
        train = recipe.train.model_dump(mode="json", exclude=OPERATIONAL | {"deepspeed_config"})
        return {"stage": stage.model_dump(mode="json"), "train": train, "seed": recipe.seed}

    return reads


def deepspeed_config_path(recipe: Recipe) -> Path:
    path = Path(recipe.train.deepspeed_config)
    if not path.is_absolute() and not path.exists():
        path = Path(__file__).resolve().parents[1] / path  # relative to the repository
    if not path.is_file():
        raise FileNotFoundError(f"train.deepspeed_config: {recipe.train.deepspeed_config} not found")
    return path.resolve()  # absolute: Ray workers run in another working directory


def build_train_for(stage: StageConfig, previous: str):
    def build(recipe: Recipe, upstream: dict[str, Path], out: Path, ctx: StepContext):
        from orca_core.train import TrainJob, validate_checkpoint

        if ctx.trainer is None or ctx.work_dir is None:
            raise RuntimeError("training needs a trainer (tasks/train.py or orca_core.train.fit) and a work folder")
        checkpoints = ctx.work_dir / "checkpoints"
        resume = latest_checkpoint(checkpoints)
        if resume is not None and not validate_checkpoint(resume):
            log.warning("checkpoint %s does not validate; deleting it and training from the start", resume)
            shutil.rmtree(checkpoints)
            resume = None
        t = recipe.train
        job = TrainJob(
            init_dir=upstream[previous], dataset=upstream[f"dataset-{stage.name}"] / DATASET_FILE, out_dir=out,
            checkpoint_dir=checkpoints, epochs=stage.epochs or 1, max_steps=stage.steps, lr=stage.lr or t.lr, min_lr_ratio=t.min_lr_ratio,
            warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, adam_betas=t.adam_betas, micro_batch_size=t.micro_batch_size,
            grad_accum=t.grad_accum, max_len=t.max_len, grad_clip=t.grad_clip, precision=t.precision,
            zero_stage=t.zero_stage, deepspeed_config=deepspeed_config_path(recipe), seed=recipe.seed,
            checkpoint_every=t.checkpoint_every, gradient_checkpointing=t.gradient_checkpointing,
            attn_implementation=t.attn_implementation, padding_free=t.padding_free,
            recipe_slice={"recipe": recipe.name, "stage": stage.model_dump(mode="json"), "train": t.model_dump(mode="json"),
                          "model": recipe.model.model_dump(mode="json")},
        )
        summary = ctx.trainer(job, resume)
        final = latest_checkpoint(checkpoints)
        if t.keep_training_state and final is not None:  # opt-in: ~12 bytes a parameter, hashed with the weights
            shutil.copytree(final, out / TRAINING_STATE)
        return {"steps": summary.get("steps", 0)}, {**summary, "resumed_from": resume.name if resume else None}

    return build


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest `step<N>` checkpoint in a DeepSpeed checkpoint folder."""
    tags = [p for p in folder.glob("step*") if p.is_dir() and p.name[4:].isdigit()] if folder.is_dir() else []
    return max(tags, key=lambda p: int(p.name[4:]), default=None)
