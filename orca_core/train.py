"""One curriculum stage: fine-tune the student on packed teacher traces with DeepSpeed, then export it.

Orca learns only from the teacher's tokens: an optimizer step's loss is the mean
cross-entropy over every label token of the step, across its micro-batches and
ranks (prompt and padding are -100), so it does not depend on how the step's rows
are split (see loss_scale). Rows pack several examples;
position ids restart at each one and no attention mask is passed, so
transformers builds a block-diagonal causal mask and examples never see each
other. The first token of each segment is never a target either.

The same code runs in one process (tests, the tiny recipe), under a launcher
(torchrun, deepspeed) and in each Ray Train worker (a gloo/NCCL group already
set up: DeepSpeed wraps it). A run is reproducible and resumable to the bit on
CPU fp32: the data order of an epoch is a permutation seeded by (seed, epoch),
a checkpoint stores the step and the position in the epoch, and a resumed run
skips exactly the micro-batches done.

DeepSpeed builds its shared-memory all-reduce op (`deepspeed_shm_comm`, about
two minutes of C++ compile) whenever it creates its torch comm backend on a CPU
accelerator, although only tensor-parallel inference uses it. Marking the op
incompatible in `deepspeed.ops.__compatible_ops__` (a dict DeepSpeed keeps and
consults in `build_shm_op`) keeps plain gloo collectives and skips the build.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import deepspeed
import matplotlib
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from orca_core import schedule
from orca_core.model import generation_config
from orca_core.packed import PACKED_SCHEMA, PackedRows
from orca_core.recipe.models import FLASH_NEEDS, FLEX_ON_CPU, PADDING_FREE_ATTENTION

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLUMNS = ["input_ids", "labels", "position_ids"]
ROW_SCHEMA = pa.schema([PACKED_SCHEMA.field(name) for name in COLUMNS])
IGNORE = -100
Metrics = dict[str, Any]


@dataclass
class TrainJob:
    init_dir: Path  # HF folder the stage starts from (with its tokenizer)
    dataset: Path  # packed Parquet
    out_dir: Path  # the export
    checkpoint_dir: Path
    epochs: int  # passes over the data, unless max_steps is set
    lr: float
    max_len: int
    micro_batch_size: int
    grad_accum: int = 1
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16
    zero_stage: int = 2
    deepspeed_config: Path = Path("infra/deepspeed/zero2.json")
    seed: int = 0
    checkpoint_every: int = 50  # optimizer steps
    max_steps: int | None = None  # a fixed step budget instead of epochs: the data cycles, epoch after epoch
    gradient_checkpointing: bool = False  # recompute activations in the backward: memory for time, same weights
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 | flex_attention (check_attention)
    padding_free: bool = False  # micro-batches flattened into one row without padding (a varlen/block-mask kernel)
    recipe_slice: dict[str, Any] = field(default_factory=dict)


def deepspeed_config(job: TrainJob, world_size: int) -> dict[str, Any]:
    """The JSON's tuning (buckets, offload, ...) with the job's batch, clipping, ZeRO stage, precision and optimizer."""
    config = json.loads(Path(job.deepspeed_config).read_text())
    config.pop("scheduler", None)  # the schedule is ours (lr_factor)
    params = config.get("optimizer", {}).get("params", {})
    config.update(
        train_micro_batch_size_per_gpu=job.micro_batch_size,
        gradient_accumulation_steps=job.grad_accum,
        train_batch_size=job.micro_batch_size * job.grad_accum * world_size,
        gradient_clipping=job.grad_clip,
        bf16={"enabled": job.precision == "bf16"},
        fp16={"enabled": False},
        zero_optimization={**config.get("zero_optimization", {}), "stage": job.zero_stage},
        # torch's AdamW: DeepSpeed's FusedAdam/CPUAdam JIT-compile for minutes on a CPU host
        optimizer={"type": "AdamW", "params": {**params, "lr": job.lr, "weight_decay": job.weight_decay,
                                                "betas": list(job.adam_betas), "torch_adam": True}},
    )
    return config


def lr_factor(step: int, job: TrainJob, total_steps: int) -> float:
    """Linear warmup to lr, then cosine down to min_lr_ratio * lr at the last optimizer step."""
    if step < job.warmup_steps:
        return (step + 1) / job.warmup_steps
    progress = (step - job.warmup_steps) / max(1, total_steps - job.warmup_steps - 1)
    return job.min_lr_ratio + (1 - job.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def steps_per_epoch(n_rows: int, job: TrainJob, world_size: int) -> int:
    return schedule.steps_per_epoch(n_rows, job.micro_batch_size * job.grad_accum * world_size)


def total_steps(n_rows: int, job: TrainJob, world_size: int) -> int:
    return schedule.optimizer_steps(n_rows, job.micro_batch_size * job.grad_accum * world_size, job.epochs, job.max_steps)


def epoch_batches(n_rows: int, job: TrainJob, epoch: int, rank: int, world_size: int) -> list[np.ndarray]:
    """This rank's micro-batches (row indices) of `epoch`.

    The permutation is cycled to fill the last optimizer step (like
    DistributedSampler's padding), so every rank runs the same number of steps
    and no row is dropped; a few rows are seen twice in an epoch.
    """
    n_steps = steps_per_epoch(n_rows, job, world_size)
    order = np.random.default_rng([job.seed, epoch]).permutation(n_rows)
    mine = np.resize(order, n_steps * job.micro_batch_size * job.grad_accum * world_size)[rank::world_size]
    return np.split(mine, n_steps * job.grad_accum)


def collate(rows: pa.Table | list[dict[str, list[int]]], max_len: int, pad_id: int,
            padding_free: bool = False) -> dict[str, torch.Tensor]:
    """A micro-batch's tensors from its packed rows (an Arrow table, e.g. PackedRows.take; or row dicts), built
    with numpy from the rows' token arrays.

    Padded (the default): each row padded to max_len; padding is a segment of
    its own (positions 0, 1, ...) with no labels. Padding-free: the rows
    concatenated into one row of batch size 1 and no padding at all; each row
    starts a segment at position 0, which is where varlen (FlashAttention) and
    block-mask (flex_attention) kernels cut sequences, and where
    shifted_targets puts no target.
    """
    if isinstance(rows, list):  # rows made by hand (tests, benches)
        rows = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    lengths = pc.list_value_length(rows["input_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)
    if len(lengths) and (n := lengths.max()) > max_len:
        raise ValueError(f"packed row of {n} tokens is longer than max_len {max_len}")
    values = {name: pc.list_flatten(rows[name]).to_numpy().astype(np.int64) for name in COLUMNS}
    if padding_free:
        return {name: torch.from_numpy(value)[None] for name, value in values.items()}
    row = np.repeat(np.arange(len(lengths)), lengths)
    column = np.arange(len(row)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    padding = np.arange(max_len) - lengths[:, None]  # where >= 0: a padding position, counted from 0
    batch = {"input_ids": np.full((len(lengths), max_len), pad_id, np.int64),
             "labels": np.full((len(lengths), max_len), IGNORE, np.int64), "position_ids": padding}
    for name, value in values.items():
        batch[name][row, column] = value
    return {name: torch.from_numpy(tensor) for name, tensor in batch.items()}


def shifted_targets(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The label each position predicts (the next token's); none across a segment start."""
    return labels[:, 1:].masked_fill(position_ids[:, 1:] == 0, IGNORE)


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per position (0 where there is no target); shape (batch, len - 1)."""
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")


def _prepare_distributed() -> None:
    """Without a launcher (no WORLD_SIZE) and without a group (Ray sets one up): a world of one.

    Its store is in memory: no port to pick or to collide on, and no MASTER_* or
    RANK variables left in the environment for child processes to inherit.
    """
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # see the module docstring
    if dist.is_initialized():
        return
    backend = get_accelerator().communication_backend_name()
    if "WORLD_SIZE" in os.environ:  # a launcher's world, joined before zero.Init partitions the model over it
        deepspeed.init_distributed(backend)
        return
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine requires it
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def setup(job: TrainJob) -> tuple[deepspeed.DeepSpeedEngine, PackedRows]:
    """The DeepSpeed engine (model, AdamW, schedule) and the packed rows."""
    _prepare_distributed()
    world_size = dist.get_world_size()
    table = PackedRows(job.dataset, COLUMNS)  # memory-mapped: this rank reads only the rows it takes
    if len(table) == 0:
        raise ValueError(f"{job.dataset} has no rows")
    steps = total_steps(len(table), job, world_size)
    torch.manual_seed(job.seed)
    config = deepspeed_config(job, world_size)
    model = load_model(job, config)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, job.weight_decay),
        config=config,
        lr_scheduler=lambda optimizer: LambdaLR(optimizer, lambda step: lr_factor(step, job, steps)),
    )
    _share_fp32_master(engine.optimizer)
    return engine, table


def _share_fp32_master(optimizer: Any) -> None:
    """ZeRO-3 in fp32: make the optimizer's fp32 master partitions the parameters' own partitions.

    DeepSpeed (0.19) skips the master copy when a partition is already fp32 on the optimizer's device, but it
    compares `tensor.device` with the string 'cpu', which is never equal on torch 2.x: each rank keeps a second
    fp32 copy of its partition (4 bytes a parameter of it). Pointing the master at the partition's storage is
    what that check meant: the step updates the weights in place, and its copy back is a copy onto itself.
    bf16 training needs its fp32 master (a different dtype) and is left alone, as are other stages.
    """
    flats = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    masters = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    if flats is None or masters is None:
        return
    for flat, master in zip(flats, masters):
        if (flat is not None and master is not flat and flat.dtype == master.dtype
                and flat.device == master.device and flat.shape == master.shape):
            master.data = flat.data


def check_attention(job: TrainJob) -> None:
    """Refuse an attention kernel this host cannot train with (the recipe already refuses them without use_gpu)."""
    cuda, flash_attn = torch.cuda.is_available(), importlib.util.find_spec("flash_attn") is not None
    if job.attn_implementation == "flash_attention_2" and not (cuda and flash_attn):
        raise ValueError(f"train.attn_implementation: {FLASH_NEEDS} (here: CUDA {cuda}, flash_attn {flash_attn})")
    if job.attn_implementation == "flex_attention" and not cuda:
        raise ValueError(f"train.attn_implementation: {FLEX_ON_CPU}")
    if job.padding_free and job.attn_implementation not in PADDING_FREE_ATTENTION:
        raise ValueError(f"train.padding_free: needs train.attn_implementation {' or '.join(PADDING_FREE_ATTENTION)} "
                         f"(it is {job.attn_implementation})")


@contextmanager
def _sharded_at_load(ds_config: dict[str, Any]) -> Iterator[None]:
    """Under ZeRO-3, from_pretrained builds the model inside deepspeed.zero.Init: each parameter is partitioned
    as it is created and each checkpoint tensor is copied into its partitions, so no rank holds the whole model.

    transformers finds the config through a weakref to an HfDeepSpeedConfig (as accelerate and the Trainer do):
    this reference keeps it alive for the load, and it is unset afterwards so that later from_pretrained calls in
    the process (an evaluation, a test) load ordinary models.
    """
    if ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    hf_ds_config = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del hf_ds_config


def load_model(job: TrainJob, ds_config: dict[str, Any]) -> PreTrainedModel:
    """The model to train, in train mode: fp32 weights (DeepSpeed casts for bf16), partitioned at load under ZeRO-3,
    with the job's attention kernel and gradient checkpointing."""
    check_attention(job)
    with _sharded_at_load(ds_config):
        model = AutoModelForCausalLM.from_pretrained(job.init_dir, dtype=torch.float32,
                                                     attn_implementation=job.attn_implementation)
    if job.gradient_checkpointing:  # non-reentrant: the variant DeepSpeed's ZeRO-3 parameter hooks work with
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's groups: matrices decayed, norms and other 1-d parameters not.

    A parameter partitioned by zero.Init holds an empty placeholder; its real shape is ds_shape.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    is_matrix = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in params]
    return [
        {"params": [p for p, matrix in zip(params, is_matrix) if matrix], "weight_decay": weight_decay},
        {"params": [p for p, matrix in zip(params, is_matrix) if not matrix], "weight_decay": 0.0},
    ]


def label_count(batch: dict[str, torch.Tensor]) -> int:
    """The label tokens of a collated micro-batch: the targets left after the shift."""
    return int((shifted_targets(batch["labels"], batch["position_ids"]) != IGNORE).sum())


def loss_scale(engine: deepspeed.DeepSpeedEngine, step_label_tokens: int) -> float:
    """The factor on a micro-batch's summed token loss that makes the step's gradient d(global token mean)/dθ.

    The step's loss is the sum over every label token of its micro-batches on
    every rank divided by N, the step's label tokens over all ranks. DeepSpeed
    divides each backward by gradient_accumulation_steps (engine.backward's
    scale_wrt_gas) and averages gradients over the data-parallel ranks; the
    factor gas * dp / N undoes both, so the result no longer depends on how the
    step's rows are split into micro-batches and ranks.
    """
    return engine.gradient_accumulation_steps() * engine.dp_world_size / max(1, step_label_tokens)


def _micro_step(engine: deepspeed.DeepSpeedEngine, batch: dict[str, torch.Tensor], scale: float) -> float:
    """Forward, backward of the summed token loss times `scale` (see loss_scale), and (at the accumulation
    boundary) the optimizer step; returns the micro-batch's summed token loss."""
    batch = {name: tensor.to(engine.device) for name, tensor in batch.items()}
    logits = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    loss_sum = token_losses(logits, shifted_targets(batch["labels"], batch["position_ids"])).sum()
    engine.backward(loss_sum * scale)
    engine.step()
    return loss_sum.item()


def _checkpoint(engine, job: TrainJob, step: int, epoch: int, position: int, metrics: list[Metrics]) -> Path:
    tag = f"step{step}"
    client_state = {"step": step, "epoch": epoch, "position": position, "metrics": metrics}
    engine.save_checkpoint(str(job.checkpoint_dir), tag=tag, client_state=client_state)
    return Path(job.checkpoint_dir) / tag


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds a pickled object outside the tensors, containers and DeepSpeed classes allowed."""


# What DeepSpeed's optimizer states pickle besides tensors and containers (ZeRO 1-3, bf16): loaded by name, never run.
DEEPSPEED_GLOBALS = [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def safe_load(path: str | Path, **kwargs: Any) -> Any:
    """torch.load with weights_only=True: tensors, containers and DEEPSPEED_GLOBALS, nothing else unpickled."""
    try:
        with torch.serialization.safe_globals(DEEPSPEED_GLOBALS):
            return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = found.group(1) if found else str(error).strip().splitlines()[-1]
        raise UnsafeCheckpointError(f"{path}: refusing to unpickle {what}: a checkpoint may hold only tensors, "
                                    "containers and DeepSpeed's training states (weights_only=True)") from None


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's file checkpoint engine, loading with safe_load (its own load unpickles anything)."""

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location=map_location)


def _resume(engine, resume_from: Path) -> dict[str, Any]:
    """Load a checkpoint folder (step<n>) or a checkpoint dir (its `latest`); return the client state.

    The checkpoint may come from a shared store: its files are read with safe_load.
    """
    current = type(engine.checkpoint_engine)
    if current is not TorchCheckpointEngine:  # another engine (fast, decoupled) has its own load: not ours to make safe
        raise ValueError(f"resume supports DeepSpeed's default checkpoint engine, not {current.__name__}")
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    path = Path(resume_from)
    load_dir, tag = (path, None) if (path / "latest").exists() else (path.parent, path.name)
    loaded, client_state = engine.load_checkpoint(str(load_dir), tag=tag)
    if loaded is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint at {resume_from}")
    return client_state


def fit(
    job: TrainJob,
    on_checkpoint: Callable[[Path, Metrics], None] | None = None,
    resume_from: Path | None = None,
    on_step: Callable[[Metrics], None] | None = None,
) -> dict[str, Any]:
    """Train `job` (from scratch or from a checkpoint), export it, and return a summary with every step's metrics.

    on_step(metrics of the step) runs on rank 0 after each optimizer step;
    on_checkpoint(checkpoint folder, metrics of the step) on every rank after each save.
    """
    engine, table = setup(job)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    pad_id = engine.module.config.pad_token_id
    state = _resume(engine, resume_from) if resume_from else {"step": 0, "epoch": 0, "position": 0, "metrics": []}
    step, metrics = state["step"], list(state["metrics"])
    elapsed = metrics[-1]["elapsed"] if metrics else 0.0
    last_step = total_steps(len(table), job, world_size)
    epochs = -(-last_step // steps_per_epoch(len(table), job, world_size))  # the last one partly, under max_steps
    for epoch in range(state["epoch"], epochs):
        micro = epoch_batches(len(table), job, epoch, rank, world_size)
        start = state["position"] if epoch == state["epoch"] else 0
        for position in range(start, len(micro), job.grad_accum):
            if step == last_step:
                break
            started, lr = time.perf_counter(), engine.get_lr()[0]
            rows = [table.take(indices) for indices in micro[position:position + job.grad_accum]]
            batches = [collate(chunk, job.max_len, pad_id, job.padding_free) for chunk in rows]
            n_tokens = sum(int(pc.sum(pc.list_value_length(chunk["input_ids"])).as_py()) for chunk in rows)
            counts = torch.tensor([n_tokens, sum(map(label_count, batches))], dtype=torch.float64, device=engine.device)
            dist.all_reduce(counts)  # the step's tokens and label tokens over all ranks, known before any backward
            n_labels = int(counts[1])
            loss_sum = sum(_micro_step(engine, batch, loss_scale(engine, n_labels)) for batch in batches)
            loss = torch.tensor(loss_sum / max(1, n_labels), dtype=torch.float64, device=engine.device)
            dist.all_reduce(loss)  # each rank's share of the step's token mean: their sum is the mean
            step, seconds = step + 1, time.perf_counter() - started
            elapsed += seconds
            metrics.append({
                "step": step, "epoch": epoch, "loss": loss.item(), "lr": lr,
                "tokens": int(counts[0]), "label_tokens": n_labels, "tokens_per_s": counts[0].item() / seconds,
                "seconds": seconds, "elapsed": elapsed,
            })
            if on_step and rank == 0:
                on_step(metrics[-1])
            if step % job.checkpoint_every == 0 or step == last_step:  # the last: an export that fails resumes here
                path = _checkpoint(engine, job, step, epoch, position + job.grad_accum, metrics)
                if on_checkpoint:  # on every rank: Ray Train wants a report from each worker
                    on_checkpoint(path, metrics[-1])
    export(engine, job, metrics, job.init_dir)
    engine.destroy()
    final = metrics[-1] if metrics else {}
    return {"steps": step, "final_loss": final.get("loss"), "elapsed": elapsed, "out_dir": str(job.out_dir),
            "metrics": metrics}


def export(engine, job: TrainJob, metrics: list[Metrics], tokenizer_dir: Path) -> None:
    """Write the trained model as a self-describing HF folder, with recipe.json, metrics.parquet and loss_curve.png.

    Under ZeRO-3 every rank takes part in gathering the weights; rank 0 writes.
    """
    if engine.zero_optimization_partition_weights():
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = engine.module.state_dict()
    if dist.get_rank() != 0:
        return
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = engine.module
    model.config.dtype = next(iter(state_dict.values())).dtype  # bf16 training exports bf16 weights
    model.generation_config = generation_config(tokenizer)
    model.save_pretrained(out, state_dict=state_dict)
    tokenizer.save_pretrained(out)
    (out / "recipe.json").write_text(json.dumps(job.recipe_slice, indent=2, sort_keys=True, default=str))
    pq.write_table(pa.Table.from_pylist(metrics), out / "metrics.parquet")
    _plot(metrics, out / "loss_curve.png")


def _plot(metrics: list[Metrics], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (label tokens)")
    lr_ax = ax.twinx()
    lr_ax.plot([m["step"] for m in metrics], [m["lr"] for m in metrics], color="tab:orange", alpha=0.5)
    lr_ax.set_ylabel("learning rate")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def validate_checkpoint(path: Path) -> bool:
    """Whether a checkpoint (a step<n> folder, or a dir with `latest`) has all its DeepSpeed files, readable.

    Every .pt file must unpickle (memory-mapped), the model states must carry our
    client state, and there must be one ZeRO shard per rank. That catches missing,
    truncated and unreadable files; it does not checksum tensor data, so a bit flip
    inside a tensor goes unnoticed.
    """
    path = Path(path)
    if (path / "latest").exists():
        path = path / (path / "latest").read_text().strip()
    try:
        states = {f.name: safe_load(f, map_location="cpu", mmap=True) for f in path.glob("*.pt")}
        models = [state for name, state in states.items() if name.endswith("model_states.pt")]
        ranks = models[0]["dp_world_size"] * models[0]["mp_world_size"]
        stage = models[0]["ds_config"].get("zero_optimization", {}).get("stage", 0)
    except Exception:  # unreadable, unsafe, or no model states
        return False
    shards = sum(name.endswith("optim_states.pt") for name in states)
    return (all("step" in state for state in models) and (stage == 0 or shards == ranks)
            and (stage < 3 or len(models) == ranks))
