"""Training: golden losses, token-weighted loss at 1 and 2 ranks, packing isolation, kill -9 and exact resume,
export, ZeRO-3 export, checkpoint checks (final step, damaged, unsafe pickles).

Everything runs on a tiny random-init Llama (hidden 32, 2 layers, vocab 300) and a
synthetic packed dataset (the response is a function of the prompt, so the loss falls).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from orca_core import train
from orca_core.model import build_base_model
from orca_core.recipe.models import ModelConfig, TokenizerConfig
from orca_core.train import TrainJob, collate, fit, shifted_targets, token_losses, validate_checkpoint

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")
MAX_LEN, VOCAB = 64, 300
ARCH = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": MAX_LEN}
# The first five losses of `golden_job` (fp32, ZeRO-2, one process) on this machine's torch 2.13 CPU:
# each step's token mean over its label tokens (was the mean of per-micro-batch means: 5.72893, 5.67908, ...).
GOLDEN = [5.726810455322266, 5.683976144501657, 5.63841438293457, 5.541543737634436, 5.4173233174832065]
PACKED_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("position_ids", pa.list_(pa.int32())),
    ("n_examples", pa.int32()), ("n_tokens", pa.int32()), ("n_label_tokens", pa.int32()),
])
CHILD = """
import json, sys, time
from orca_core.train import TrainJob, fit
job = TrainJob(**json.loads(sys.argv[1]))
def on_step(m):
    print("STEP", m["step"], flush=True)
    time.sleep(float(sys.argv[3]))
def on_checkpoint(path, metrics):
    print("CKPT", path, flush=True)
result = fit(job, on_checkpoint=on_checkpoint, resume_from=sys.argv[2] or None, on_step=on_step)
print("LOSSES", json.dumps([m["loss"] for m in result["metrics"]]), flush=True)
"""
# Rank r of a torchrun world: fit, then rank 0 writes the step losses to argv[2] (torchrun --standalone: no fixed port).
RANK_CHILD = """
import json, os, sys
from orca_core.train import TrainJob, fit
result = fit(TrainJob(**json.loads(sys.argv[1])))
if os.environ["RANK"] == "0":
    open(sys.argv[2], "w").write(json.dumps([m["loss"] for m in result["metrics"]]))
"""


def make_tokenizer(out: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE of VOCAB tokens with the pipeline's special tokens ([PAD] = 0, <|im_end|> = 2)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["[PAD]", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([f"what is {i} plus {i * 7 % 13}? it is {i + i * 7 % 13}." for i in range(300)], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="[PAD]", eos_token="<|im_end|>")
    tokenizer.save_pretrained(out)
    return tokenizer


def make_packed(path: Path, n_rows: int, eos: int, seed: int = 0) -> None:
    """Rows of examples "prompt, response, eos", labels on the response, packed up to MAX_LEN.

    The response is the prompt reversed and mapped to 16 tokens: learnable in a few steps.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        row = {"input_ids": [], "labels": [], "position_ids": [], "n_examples": 0, "n_label_tokens": 0}
        while True:
            prompt = rng.integers(3, VOCAB, int(rng.integers(3, 12))).tolist()
            response = [3 + t % 16 for t in reversed(prompt)] + [eos]
            if len(row["input_ids"]) + len(prompt) + len(response) > MAX_LEN:
                break
            row["input_ids"] += prompt + response
            row["labels"] += [-100] * len(prompt) + response
            row["position_ids"] += list(range(len(prompt) + len(response)))
            row["n_examples"] += 1
            row["n_label_tokens"] += len(response)
            if rng.random() < 0.3:  # some rows end early: padding in the batch
                break
        rows.append({**row, "n_tokens": len(row["input_ids"])})
    pq.write_table(pa.Table.from_pylist(rows, schema=PACKED_SCHEMA), path)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    tokenizer = make_tokenizer(root / "tokenizer")
    assert len(tokenizer) == VOCAB
    cfg = ModelConfig(kind="random_init", architecture=ARCH, tokenizer=TokenizerConfig(kind="train_bpe"))
    build_base_model(cfg, root / "tokenizer", root / "base", seed=0)
    make_packed(root / "packed.parquet", n_rows=32, eos=tokenizer.eos_token_id)
    make_packed(root / "uneven.parquet", n_rows=32, eos=tokenizer.eos_token_id, seed=1)
    return {"root": root, "base": root / "base", "data": root / "packed.parquet", "uneven": root / "uneven.parquet"}


def golden_job(base: dict[str, Path], name: str) -> TrainJob:
    return TrainJob(
        init_dir=base["base"], dataset=base["data"], out_dir=base["root"] / name / "out",
        checkpoint_dir=base["root"] / name / "ckpt", epochs=2, lr=3e-3, max_len=MAX_LEN, micro_batch_size=2,
        grad_accum=2, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.01, zero_stage=2,
        deepspeed_config=REPO / "infra/deepspeed/zero2.json", seed=0, checkpoint_every=3,
        recipe_slice={"stage": "test", "lr": 3e-3},
    )


def fit_capturing(job: TrainJob, capture) -> tuple[dict, dict]:
    """fit(job), with `capture(engine)` called on the trained engine just before the export."""
    captured: dict = {}

    def export(engine, *args):
        captured.update(capture(engine))
        real_export(engine, *args)

    real_export = train.export
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "export", export)
        return fit(job), captured


PROBE = torch.arange(3, 3 + 40).reshape(2, 20)


@pytest.fixture(scope="module")
def golden_run(base) -> tuple[TrainJob, dict, dict]:
    job = golden_job(base, "golden")

    def logits(engine):
        with torch.no_grad():
            return {"logits": engine.module(input_ids=PROBE).logits}

    result, captured = fit_capturing(job, logits)
    return job, result, captured


def test_golden_losses(golden_run):
    _, result, _ = golden_run
    losses = [m["loss"] for m in result["metrics"]]
    assert len(losses) == 16  # 32 rows / (2 x 2) per step, 2 epochs
    np.testing.assert_allclose(losses[:5], GOLDEN, rtol=1e-6)
    assert losses[-1] < losses[0] - 0.5
    assert [m["step"] for m in result["metrics"]] == list(range(1, 17))


def test_a_step_budget_cycles_the_data_and_ends_the_schedule_on_its_last_step(golden_run, base, tmp_path):
    job = replace(golden_job(base, "budget"), out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt",
                  epochs=1, max_steps=11)  # 8 steps an epoch: one epoch and 3 steps of the next
    metrics = fit(job)["metrics"]
    assert [m["step"] for m in metrics] == list(range(1, 12))
    assert [m["epoch"] for m in metrics] == [0] * 8 + [1] * 3
    assert metrics[-1]["lr"] == pytest.approx(job.lr * job.min_lr_ratio)  # the cosine spans the 11 steps
    golden = golden_run[1]["metrics"]  # same data order and warmup: the warmup steps match the 2-epoch run
    np.testing.assert_allclose([m["loss"] for m in metrics[:2]], [m["loss"] for m in golden[:2]], rtol=1e-6)
    assert (job.out_dir / "model.safetensors").is_file()


def layout_job(base: dict[str, Path], name: str, micro_batch_size: int) -> TrainJob:
    """4 optimizer steps of 8 rows (32 rows, accumulation 2) on rows of 4 to 34 label tokens."""
    return replace(golden_job(base, name), dataset=base["uneven"], epochs=1, micro_batch_size=micro_batch_size,
                   checkpoint_every=100)


def run_on_ranks(job: TrainJob, ranks: int, tmp_path: Path) -> list[float]:
    (tmp_path / "child.py").write_text(RANK_CHILD)
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
            str(tmp_path / "child.py"), json.dumps(asdict(job), default=str), str(tmp_path / "losses.json")]
    done = subprocess.run(args, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / "losses.json").read_text())


def step_rows(job: TrainJob, world_size: int, step: int) -> set[int]:
    """The rows of optimizer step `step` (from 0) of epoch 0, over all ranks."""
    steps = slice(step * job.grad_accum, (step + 1) * job.grad_accum)
    return {int(i) for rank in range(world_size) for batch in train.epoch_batches(32, job, 0, rank, world_size)[steps]
            for i in batch}


def first_step_losses(job: TrainJob, world_size: int) -> tuple[float, float]:
    """Step 1's loss at the base weights, by hand: (token mean of the step, mean of per-micro-batch means)."""
    model = AutoModelForCausalLM.from_pretrained(job.init_dir, dtype=torch.float32)
    table = pq.read_table(job.dataset)
    sums, counts = [], []
    for rank in range(world_size):
        for indices in train.epoch_batches(len(table), job, 0, rank, world_size)[:job.grad_accum]:
            batch = collate(table.take(indices).to_pylist(), MAX_LEN, pad_id=0)
            targets = shifted_targets(batch["labels"], batch["position_ids"])
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            sums.append(token_losses(logits, targets).sum().item())
            counts.append(int((targets != -100).sum()))
    return sum(sums) / sum(counts), float(np.mean(np.divide(sums, counts)))


def test_the_loss_is_the_token_mean_of_the_step_whatever_the_micro_batches_and_ranks(base, tmp_path):
    one = layout_job(base, "one-rank", micro_batch_size=4)  # 1 rank x 4 rows x 2 micro-batches
    two = replace(layout_job(base, "two-ranks", micro_batch_size=2), out_dir=tmp_path / "out",
                  checkpoint_dir=tmp_path / "ckpt")  # 2 ranks x 2 rows x 2 micro-batches
    # epoch_batches deals each step's 8 rows of the permutation out to the ranks: both layouts see the same rows
    for step in range(4):
        assert step_rows(one, 1, step) == step_rows(two, 2, step) and len(step_rows(one, 1, step)) == 8
    losses_one = [m["loss"] for m in fit(one)["metrics"]]
    losses_two = run_on_ranks(two, 2, tmp_path)
    assert len(losses_one) == len(losses_two) == 4
    np.testing.assert_allclose(losses_two, losses_one, rtol=0, atol=1e-5)
    token_mean, _ = first_step_losses(one, 1)
    assert losses_one[0] == pytest.approx(token_mean, abs=1e-6)
    # the per-micro-batch mean (the old loss) is another number in both layouts: the rows' label counts differ
    for job, world in ((one, 1), (two, 2)):
        assert abs(first_step_losses(job, world)[1] - token_mean) > 1e-4
    assert losses_one[-1] < losses_one[0]


def test_packed_row_loss_is_the_sum_of_its_examples(base):
    model = AutoModelForCausalLM.from_pretrained(base["base"], dtype=torch.float32)
    row = next(r for r in pq.read_table(base["data"]).to_pylist() if r["n_examples"] >= 3 and r["n_tokens"] < MAX_LEN)
    batch = collate([row], MAX_LEN, pad_id=0)
    n = row["n_tokens"]
    assert batch["position_ids"][0, n:].tolist() == list(range(MAX_LEN - n))
    assert (batch["labels"][0, n:] == -100).all() and (batch["input_ids"][0, n:] == 0).all()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        packed = token_losses(logits, shifted_targets(batch["labels"], batch["position_ids"])).sum()
        alone = 0.0
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [n]
        for start, end in zip(starts, starts[1:]):
            ids = torch.tensor([row["input_ids"][start:end]])
            labels = torch.tensor([row["labels"][start:end]])
            positions = torch.arange(end - start)[None]
            logits = model(input_ids=ids, use_cache=False).logits
            alone += token_losses(logits, shifted_targets(labels, positions)).sum()
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits  # one causal sequence: examples see earlier ones
        leaky = token_losses(leaky, shifted_targets(batch["labels"], batch["position_ids"])).sum()
    assert len(starts) - 1 == row["n_examples"]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    assert abs(leaky - alone) > 1e-3  # the check above can fail


def _child(job: TrainJob, resume: str = "", sleep: float = 0.0, **kw) -> subprocess.Popen:
    args = [sys.executable, "-c", CHILD, json.dumps(asdict(job), default=str), resume, str(sleep)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, **kw)


def test_kill_and_resume_gives_the_same_losses(golden_run, base, tmp_path):
    job = replace(golden_job(base, "killed"), out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt")
    with open(tmp_path / "first.log", "w") as log, _child(job, sleep=0.3, stderr=log) as child:
        checkpoint = None
        for line in child.stdout:
            if line.startswith("CKPT") and line.strip().endswith("step6"):
                checkpoint = line.split(maxsplit=1)[1].strip()
                child.send_signal(signal.SIGKILL)
                break
        rest = child.stdout.read()
        assert child.wait() == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    assert checkpoint and "LOSSES" not in rest
    assert validate_checkpoint(Path(checkpoint))
    with open(tmp_path / "second.log", "w") as log, _child(job, resume=checkpoint, stderr=log) as resumed:
        out = resumed.stdout.read()
        assert resumed.wait() == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert "STEP 7\n" in out and "STEP 6\n" not in out
    losses = json.loads(out.split("LOSSES", 1)[1])
    assert losses == [m["loss"] for m in golden_run[1]["metrics"]]


def test_export_matches_the_live_model(golden_run):
    job, result, captured = golden_run
    out = Path(job.out_dir)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.float32 and tokenizer.pad_token == "[PAD]"
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.do_sample is False
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=PROBE).logits, captured["logits"], atol=1e-6, rtol=0)
    metrics = pq.read_table(out / "metrics.parquet")
    assert metrics.num_rows == len(result["metrics"])
    assert {"step", "epoch", "loss", "lr", "tokens", "label_tokens", "tokens_per_s"} <= set(metrics.column_names)
    assert metrics["loss"].to_pylist() == [m["loss"] for m in result["metrics"]]
    assert (out / "loss_curve.png").stat().st_size > 0
    assert json.loads((out / "recipe.json").read_text()) == {"stage": "test", "lr": 3e-3}


def test_zero3_export_has_the_module_weights(golden_run, base):
    import deepspeed

    def gather(engine):
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            return {name: p.detach().clone() for name, p in engine.module.named_parameters()}

    job = replace(golden_job(base, "zero3"), zero_stage=3,
                  deepspeed_config=REPO / "infra/deepspeed/zero3_bf16.json")  # the job's fp32 wins
    result, weights = fit_capturing(job, gather)
    exported = load_file(Path(job.out_dir) / "model.safetensors")
    assert set(exported) == set(weights)
    for name, value in weights.items():
        assert torch.equal(exported[name], value), name
    zero2 = [m["loss"] for m in golden_run[1]["metrics"]]
    np.testing.assert_allclose([m["loss"] for m in result["metrics"]], zero2, rtol=1e-5)
    assert AutoModelForCausalLM.from_pretrained(job.out_dir).dtype == torch.float32


@pytest.mark.parametrize("config", sorted((REPO / "infra/deepspeed").glob("*.json")), ids=lambda p: p.stem)
def test_each_deepspeed_config_trains_at_its_own_stage_and_precision(base, tmp_path, config):
    settings = json.loads(config.read_text())
    precision = "bf16" if settings.get("bf16", {}).get("enabled") else "fp32"
    job = replace(golden_job(base, "config"), out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt",
                  epochs=1, deepspeed_config=config, zero_stage=settings["zero_optimization"]["stage"],
                  precision=precision)
    losses = [m["loss"] for m in fit(job)["metrics"]]
    assert len(losses) == 8 and np.isfinite(losses).all() and losses[-1] < losses[0]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert AutoModelForCausalLM.from_pretrained(job.out_dir).dtype == dtype
    assert validate_checkpoint(job.checkpoint_dir)


def test_validate_checkpoint_rejects_a_damaged_checkpoint(golden_run, tmp_path):
    job = golden_run[0]
    assert validate_checkpoint(job.checkpoint_dir / "step3")
    assert validate_checkpoint(job.checkpoint_dir)  # via `latest`
    damaged = shutil.copytree(job.checkpoint_dir / "step3", tmp_path / "step3")
    for file in damaged.glob("*.pt"):
        data = file.read_bytes()
        file.write_bytes(data[: len(data) // 2])
        assert not validate_checkpoint(damaged)
        file.write_bytes(data)
    assert validate_checkpoint(damaged)
    (damaged / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    assert not validate_checkpoint(damaged)
    (damaged / "mp_rank_00_model_states.pt").unlink()
    assert not validate_checkpoint(damaged)


def test_base_model_from_a_local_pretrained_folder_takes_the_tokenizer(base, tmp_path):
    pretrained = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB - 20, **ARCH))
    pretrained.save_pretrained(tmp_path / "pretrained")
    cfg = ModelConfig(kind="pretrained", path=str(tmp_path / "pretrained"), tokenizer=TokenizerConfig(kind="train_bpe"))
    build_base_model(cfg, base["base"], tmp_path / "stage0", seed=0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "stage0")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "stage0")
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == VOCAB
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    old = pretrained.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight[: len(old)], old)


def test_the_last_step_is_checkpointed_and_resuming_there_only_exports(golden_run, tmp_path):
    job, result, _ = golden_run  # 16 steps, a checkpoint every 3
    steps = sorted(int(p.name[4:]) for p in job.checkpoint_dir.glob("step*"))
    assert steps == [3, 6, 9, 12, 15, 16]
    assert (job.checkpoint_dir / "latest").read_text().strip() == "step16"
    assert validate_checkpoint(job.checkpoint_dir / "step16")
    again = replace(job, out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt")  # an export that crashed, rerun
    trained = []
    resumed = fit(again, resume_from=job.checkpoint_dir / "step16", on_step=trained.append)
    assert trained == [] and resumed["steps"] == 16 and resumed["metrics"] == result["metrics"]
    exported = load_file(tmp_path / "out/model.safetensors")
    original = load_file(Path(job.out_dir) / "model.safetensors")
    assert set(exported) == set(original) and all(torch.equal(exported[k], original[k]) for k in original)


class RunsCode:
    """Unpickling this opens (creates) `marker`: what a weights_only=False load of a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_with_a_disallowed_pickled_object_is_refused(golden_run, tmp_path):
    job = golden_run[0]
    tampered = shutil.copytree(job.checkpoint_dir / "step3", tmp_path / "step3")
    states = tampered / "mp_rank_00_model_states.pt"
    client_state = torch.load(states, weights_only=False)  # our own file, just written by the golden run
    torch.save({**client_state, "note": RunsCode(tmp_path / "marker")}, states)
    again = replace(job, out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt")
    refused = r"mp_rank_00_model_states\.pt: refusing to unpickle io\.open"
    with pytest.raises(train.UnsafeCheckpointError, match=refused):
        fit(again, resume_from=tampered)
    assert not validate_checkpoint(tampered)
    assert not (tmp_path / "marker").exists()
    assert fit(replace(again, max_steps=4), resume_from=job.checkpoint_dir / "step3")["steps"] == 4  # the clean one


# -- ZeRO-3 sharded at load; gradient checkpointing; the attention kernel ---------------------------------------
def zero3_job(base: dict[str, Path], name: str, **changes) -> TrainJob:
    return replace(golden_job(base, name), zero_stage=3, deepspeed_config=REPO / "infra/deepspeed/zero3_bf16.json",
                   **changes)  # the job's fp32 wins over the JSON's bf16


def test_zero3_builds_the_model_partitioned_and_loads_the_checkpoint_into_the_partitions(golden_run, base):
    import deepspeed
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    job = zero3_job(base, "zero3-load")
    model = train.load_model(job, train.deepspeed_config(job, world_size=1))
    assert not is_deepspeed_zero3_enabled()  # unset after the load: later from_pretrained calls load plain models
    reference = AutoModelForCausalLM.from_pretrained(base["base"], dtype=torch.float32)
    params, expected = dict(model.named_parameters()), dict(reference.named_parameters())
    assert set(params) == set(expected) and all(p.numel() > 0 for p in expected.values())
    for name, param in params.items():  # a placeholder: the values live in the rank's partition (here the only one)
        assert param.numel() == 0 and tuple(param.ds_shape) == expected[name].shape, name
        assert param.ds_tensor.numel() == expected[name].numel() and param.ds_tensor.dtype == torch.float32, name
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, param in params.items():
            assert torch.equal(param, expected[name]), name
    decayed, plain = train.param_groups(model, 0.01)  # by the real shapes, not the placeholders'
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert sum(p.ds_numel for p in decayed["params"]) == sum(p.numel() for p in expected.values() if p.ndim == 2)
    assert len(plain["params"]) == 2 * ARCH["num_hidden_layers"] + 1  # the RMSNorms
    ordinary = train.load_model(golden_job(base, "zero2-load"), train.deepspeed_config(golden_job(base, "x"), 1))
    assert not hasattr(next(ordinary.parameters()), "ds_id")  # ZeRO-2 loads a plain model


# Rank r of a 2-rank ZeRO-3 world: the share of the parameters it holds right after the load, then fit with gradient
# checkpointing; rank 0 saves the weights gathered just before the export (torch.save) and writes its report.
ZERO3_RANK_CHILD = """
import json, os, sys
import deepspeed, torch
from orca_core import train
job = train.TrainJob(**json.loads(sys.argv[1]))
train._prepare_distributed()
model = train.load_model(job, train.deepspeed_config(job, world_size=2))
share = sum(p.ds_tensor.numel() for p in model.parameters()) / sum(p.ds_numel for p in model.parameters())
del model
export = train.export
def gathering_export(engine, *args):
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        trained = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    checkpointing = engine.module.is_gradient_checkpointing
    if os.environ["RANK"] == "0":
        torch.save(trained, sys.argv[2] + ".pt")
    export(engine, *args)
    shares = [None, None]
    torch.distributed.all_gather_object(shares, share)
    if os.environ["RANK"] == "0":
        open(sys.argv[2], "w").write(json.dumps({"shares": shares, "checkpointing": checkpointing}))
train.export = gathering_export
result = train.fit(job)
if os.environ["RANK"] == "0":
    report = json.loads(open(sys.argv[2]).read())
    open(sys.argv[2], "w").write(json.dumps({**report, "losses": [m["loss"] for m in result["metrics"]]}))
"""


def test_zero3_at_two_ranks_holds_half_the_model_from_the_load_and_exports_the_trained_weights(base, tmp_path):
    """About 30 s: two torchrun ranks (gloo), ZeRO-3 with gradient checkpointing, 4 optimizer steps."""
    job = replace(zero3_job(base, "zero3-ranks", micro_batch_size=2, gradient_checkpointing=True),
                  dataset=base["uneven"], epochs=1, out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt")
    (tmp_path / "child.py").write_text(ZERO3_RANK_CHILD)
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            str(tmp_path / "child.py"), json.dumps(asdict(job), default=str), str(tmp_path / "report.json")]
    done = subprocess.run(args, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["checkpointing"] is True
    assert all(0.49 < share < 0.52 for share in report["shares"]), report["shares"]  # each rank: its half, padded
    token_mean, _ = first_step_losses(job, 2)
    assert len(report["losses"]) == 4 and report["losses"][0] == pytest.approx(token_mean, abs=1e-6)
    assert report["losses"][-1] < report["losses"][0]
    trained = torch.load(tmp_path / "report.json.pt")
    exported = load_file(job.out_dir / "model.safetensors")
    assert set(exported) == set(trained)
    for name, value in trained.items():
        assert exported[name].dtype == torch.float32 and torch.equal(exported[name], value), name
    assert validate_checkpoint(job.checkpoint_dir)  # one model and one optimizer shard per rank


def test_a_zero3_run_resumes_from_its_checkpoint_to_the_same_losses_and_weights(base, tmp_path):
    job = zero3_job(base, "zero3-resume", max_steps=6, checkpoint_every=3, out_dir=tmp_path / "whole",
                    checkpoint_dir=tmp_path / "ckpt")
    whole = fit(job)["metrics"]
    again = replace(job, out_dir=tmp_path / "resumed", checkpoint_dir=tmp_path / "ckpt-resumed")
    resumed = fit(again, resume_from=job.checkpoint_dir / "step3")["metrics"]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in whole] and len(whole) == 6
    first, second = load_file(job.out_dir / "model.safetensors"), load_file(again.out_dir / "model.safetensors")
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)


def test_zero3_in_fp32_keeps_one_copy_of_each_partition(base, tmp_path):
    """DeepSpeed 0.19 would keep a second fp32 copy of each partition as the optimizer's master (train._share_fp32_master)."""
    job = zero3_job(base, "zero3-master", out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt")
    engine, _ = train.setup(job)
    optimizer = engine.optimizer
    pairs = list(zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat))
    assert pairs and all(master.data_ptr() == flat.data_ptr() for flat, master in pairs)
    engine.destroy()


def test_gradient_checkpointing_gives_the_same_losses(golden_run, base, tmp_path):
    job = replace(golden_job(base, "checkpointing"), out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt",
                  gradient_checkpointing=True)
    result, captured = fit_capturing(job, lambda engine: {"on": engine.module.is_gradient_checkpointing})
    assert captured["on"] is True
    np.testing.assert_allclose([m["loss"] for m in result["metrics"]],
                               [m["loss"] for m in golden_run[1]["metrics"]], rtol=0, atol=1e-6)
    assert "gradient_checkpointing" not in json.loads((job.out_dir / "config.json").read_text())


def test_the_attention_kernel_reaches_the_model_and_the_export_does_not_pin_it(golden_run, base, tmp_path):
    job = replace(golden_job(base, "eager"), out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt",
                  attn_implementation="eager")
    result, captured = fit_capturing(job, lambda engine: {"attn": engine.module.config._attn_implementation})
    assert captured["attn"] == "eager"
    # the same maths by another kernel: equal to float rounding, not to the bit
    np.testing.assert_allclose([m["loss"] for m in result["metrics"]],
                               [m["loss"] for m in golden_run[1]["metrics"]], rtol=0, atol=1e-5)
    config = json.loads((job.out_dir / "config.json").read_text())
    assert not any("attn" in key for key in config)  # vLLM and HF evaluation pick their own kernel
    assert AutoModelForCausalLM.from_pretrained(job.out_dir).config._attn_implementation == "sdpa"


@pytest.mark.parametrize(("changes", "refused"), [
    ({"attn_implementation": "flash_attention_2"}, r"train\.attn_implementation: flash_attention_2 needs a CUDA GPU"),
    ({"attn_implementation": "flex_attention"}, r"train\.attn_implementation: flex_attention trains only on a GPU"),
    ({"padding_free": True}, r"train\.padding_free: needs train\.attn_implementation flash_attention_2 or "
                             r"flex_attention \(it is sdpa\)"),
])
def test_an_attention_setting_this_host_cannot_train_is_refused_naming_the_field(base, tmp_path, changes, refused):
    from orca_core.recipe import RecipeError, load_recipe

    job = replace(golden_job(base, "refused"), out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt", **changes)
    with pytest.raises(ValueError, match=refused):  # at train time: no CUDA (and no flash-attn) here
        fit(job)
    assert not job.out_dir.exists()
    with pytest.raises(RecipeError, match=refused):  # at recipe load, without train.use_gpu
        load_recipe("tiny", [f"train.{key}={str(value).lower()}" for key, value in changes.items()])


def test_gradient_checkpointing_stays_out_of_the_training_key_and_the_kernel_goes_in():
    from orca_core.curriculum import train_reads_for
    from orca_core.recipe import load_recipe

    recipe = load_recipe("tiny")
    reads = train_reads_for(recipe.curriculum.stages[0])
    plain = reads(recipe)
    assert plain == reads(load_recipe("tiny", ["train.gradient_checkpointing=true"]))
    assert plain["train"]["attn_implementation"] == "sdpa" and plain["train"]["padding_free"] is False
    assert plain != reads(load_recipe("tiny", ["train.attn_implementation=eager"]))


# -- packed rows read memory-mapped from the dataset step's Arrow file, collated with numpy (padded or padding-free) --
def as_arrow(parquet: Path, out: Path, rows_per_batch: int = 5) -> Path:
    """The Parquet fixture as the dataset step writes it: an Arrow IPC file of several record batches."""
    from orca_core.packed import PACKED_SCHEMA

    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_file(sink, PACKED_SCHEMA) as writer:
        writer.write_table(pq.read_table(parquet), max_chunksize=rows_per_batch)
    return out


def test_training_on_the_memory_mapped_arrow_file_gives_the_golden_losses(golden_run, base, tmp_path):
    job = replace(golden_job(base, "arrow"), dataset=as_arrow(base["data"], tmp_path / "packed.arrow"),
                  out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt")
    losses = [m["loss"] for m in fit(job)["metrics"]]
    assert losses == [m["loss"] for m in golden_run[1]["metrics"]]  # the same rows, to the bit
    np.testing.assert_allclose(losses[:5], GOLDEN, rtol=1e-6)


def test_collate_pads_rows_taken_from_the_arrow_file(base, tmp_path):
    from orca_core.packed import PackedRows

    taken = PackedRows(as_arrow(base["data"], tmp_path / "packed.arrow"), train.COLUMNS).take([3, 0, 17])
    batch = collate(taken, MAX_LEN, pad_id=0)
    assert {name: (t.dtype, tuple(t.shape)) for name, t in batch.items()} == {
        name: (torch.long, (3, MAX_LEN)) for name in train.COLUMNS}
    for i, row in enumerate(taken.to_pylist()):
        pad = MAX_LEN - len(row["input_ids"])
        assert batch["input_ids"][i].tolist() == row["input_ids"] + [0] * pad
        assert batch["labels"][i].tolist() == row["labels"] + [-100] * pad
        assert batch["position_ids"][i].tolist() == row["position_ids"] + list(range(pad))
    from_dicts = collate(taken.to_pylist(), MAX_LEN, pad_id=0)
    assert all(torch.equal(batch[name], from_dicts[name]) for name in train.COLUMNS)
    with pytest.raises(ValueError, match=r"packed row of \d+ tokens is longer than max_len 8"):
        collate(taken, 8, pad_id=0)


def test_padding_free_collate_is_one_row_of_the_rows_with_no_padding_and_the_same_loss(base, tmp_path):
    from orca_core.packed import PackedRows

    taken = PackedRows(as_arrow(base["data"], tmp_path / "packed.arrow"), train.COLUMNS).take([3, 0, 17])
    rows = pq.read_table(base["data"]).take([3, 0, 17]).to_pylist()
    free, padded = collate(taken, MAX_LEN, pad_id=0, padding_free=True), collate(taken, MAX_LEN, pad_id=0)
    total = sum(row["n_tokens"] for row in rows)
    assert total < 3 * MAX_LEN and {tuple(t.shape) for t in free.values()} == {(1, total)}
    for name in train.COLUMNS:  # the rows end to end: no pad token, label or position anywhere
        assert free[name][0].tolist() == [v for row in rows for v in row[name]]
    # a segment starts (position 0) at every example, so at every row: no target crosses into the next
    assert int((free["position_ids"] == 0).sum()) == sum(row["n_examples"] for row in rows)
    assert train.label_count(free) == train.label_count(padded) == sum(row["n_label_tokens"] for row in rows)
    model = AutoModelForCausalLM.from_pretrained(base["base"], dtype=torch.float32)
    sums = []
    with torch.no_grad():
        for batch in (free, padded):  # transformers cuts the one row into its examples by the position ids
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            sums.append(token_losses(logits, shifted_targets(batch["labels"], batch["position_ids"])).sum().item())
    assert sums[0] == pytest.approx(sums[1], rel=1e-5)
