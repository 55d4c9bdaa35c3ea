"""Training figures on this machine. Prints JSON.

    OMP_NUM_THREADS=1 .venv/bin/python bench/train.py [--examples 1500] [--steps 30]

- packing: real-token share of packed rows (best-fit-decreasing) versus batches padded to
  their longest example, on the same oracle traces (target >= 0.98);
- packed_vs_padded: real tokens/s training on packed rows versus padded batches, same
  model and optimizer, raw torch (target >= 1.8x);
- deepspeed_overhead: step time of DeepSpeed ZeRO-2 (one worker) versus a raw torch AdamW
  loop on the same model and packed batches (target <= 10 %).

    OMP_NUM_THREADS=1 .venv/bin/python bench/train.py --memory [--layers 18]

- memory (only this section): per-rank peak RSS (VmHWM) of `fit` at 2 CPU ranks (torchrun, gloo) on a
  ~300M-parameter fp32 Llama, ZeRO-3 (built partitioned under zero.Init) versus ZeRO-0, a few optimizer
  steps on small packed rows; peaks at the final checkpoint (training) and after the export (rank 0
  gathers the full weights to write them). Target: ZeRO-3 / ZeRO-0 <= 0.6 in training. Needs ~13 GB free
  at 18 layers (ZeRO-0: ~6 GB a rank). Measured at 8 layers (168M): 3.18 / 3.71 GiB = 0.86. In fp32 DeepSpeed
  0.19.8's ZeRO-3 keeps a second fp32 copy of each partition (its same-device check compares a torch.device
  with the string "cpu": never equal), and AdamW's step over one flat partition adds full-size temporaries.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from orca_core import data
from orca_core.prompts import STRATEGIES, chat, pick_orca1_system_message
from orca_core.recipe.models import ModelConfig, OracleSettings
from orca_core.sources.procedural import generate_suite
from orca_oracle.solver import OracleBook, respond
from orca_core.tokenizer import train_bpe
from orca_core.train import TrainJob, collate, fit, shifted_targets, token_losses

from json_output import print_json  # bench/json_output.py: the script's folder is on sys.path

ARCH = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 384,
        "max_position_embeddings": 1024}
# The memory section's student: 18 layers of a Llama-300M shape (Llama-2's vocabulary) make ~297M parameters.
MEMORY_ARCH = {"hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 2816, "vocab_size": 32000,
               "max_position_embeddings": 2048}
REPO = Path(__file__).resolve().parents[1]
# torch's fused AdamW (CPU and CUDA) updates in place: the for-each kernel allocates step temporaries the size of
# the whole partition (~11 bytes a parameter of it), which would be most of ZeRO-3's peak at this size.
MEMORY_OPTIMIZER = {"optimizer": {"params": {"fused": True}}}
# Both stages bucket their collectives alike (40 MB fp32). ZeRO-3 keeps at most ~one embedding matrix of
# gathered parameters live (infra/deepspeed/zero3_bf16.json allows 1e9: the whole model on a CPU rank here).
MEMORY_ZERO = {"reduce_bucket_size": 10**7, "allgather_bucket_size": 10**7, "stage3_prefetch_bucket_size": 10**7,
               "stage3_max_live_parameters": 10**7, "stage3_max_reuse_distance": 10**7}
# ZeRO-3 re-gathers a layer once more than 10M parameters were gathered since: 40M measured 0.61x, 10M 0.585x.
# glibc's mmap threshold grows to 32 MB as big blocks are freed, after which freed parameter-sized blocks stay in
# the heap and inflate the peak of both stages alike; fixed at 1 MB, a freed tensor goes back to the kernel.
MEMORY_ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(2**20)}


def oracle_examples(n: int) -> list[dict]:
    """Orca 1 and Orca 2 style traces written by the oracle's solver (what the fan-out would collect)."""
    rows, _, _ = generate_suite(None, max(1, n // 12), 0, seed=0)
    book, settings, examples = OracleBook(rows), OracleSettings(), []
    for i, row in enumerate(rows):
        if i % 2:
            _, system = pick_orca1_system_message(row["id"], row["sub_collection"], row["multiple_choice"], 0)
        else:
            system = STRATEGIES["step-by-step"].instruction
        response = respond(book, "oracle-strong", settings, chat(system, row["inputs"]))
        examples.append({"system": system, "user": row["inputs"], "assistant": response,
                         "task_name": row["task_name"], "source_id": row["id"]})
    return examples


def train_step_time(model, batches, steps: int) -> float:
    """Median seconds per optimizer step of a plain torch AdamW loop."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for batch in (batches * (steps // len(batches) + 1))[:steps]:
        started = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        losses = token_losses(logits, shifted_targets(batch["labels"], batch["position_ids"]))
        losses.sum().div((batch["labels"] != -100).sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    return float(np.median(times[2:]))


def padded_batches(encoded: list[dict], micro: int, pad_id: int) -> list[dict]:
    """One example per row, each batch padded to its own longest example (the usual baseline)."""
    batches = []
    for start in range(0, len(encoded), micro):
        group = encoded[start:start + micro]
        width = max(len(e["input_ids"]) for e in group)
        rows = [{"input_ids": e["input_ids"], "labels": e["labels"], "position_ids": list(range(len(e["input_ids"])))}
                for e in group]
        batches.append(collate(rows, width, pad_id))
    return batches


def peak_rss_gib() -> float:
    """This process's peak resident set (VmHWM): what the kernel had to find for it at its worst."""
    kib = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    return round(int(kib.split()[1]) / 2**20, 3)


def memory_rank(job_json: str, report: Path) -> None:
    """One torchrun rank: fit the job; its peak RSS at the final checkpoint (training) and after the export."""
    from orca_core.train import _prepare_distributed

    _prepare_distributed()  # the process group joined and every library imported: the rank's floor, no model yet
    rss = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS"))
    peaks = {"floor": round(int(rss.split()[1]) / 2**20, 3)}
    fit(TrainJob(**json.loads(job_json)), on_checkpoint=lambda path, metrics: peaks.update(train=peak_rss_gib()))
    peaks["with_export"] = peak_rss_gib()
    Path(f"{report}.{os.environ['RANK']}").write_text(json.dumps(peaks))


def memory_model(folder: Path, layers: int) -> int:
    """A random-init fp32 Llama with a small tokenizer (the export copies it) in `folder`; its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_bpe([f"example {i} of the memory bench" for i in range(200)], 300, folder)
    config = LlamaConfig(num_hidden_layers=layers, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **MEMORY_ARCH)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def packed_rows(path: Path, rows: int, length: int, vocab: int) -> None:
    """Rows of four examples each (half prompt, half labelled answer), position ids restarting per example."""
    rng, part = np.random.default_rng(0), length // 4
    table = [{"input_ids": rng.integers(3, vocab, length).tolist(),
              "labels": ([-100] * (part // 2) + rng.integers(3, vocab, part - part // 2).tolist()) * 4,
              "position_ids": list(range(part)) * 4, "n_examples": 4, "n_tokens": length,
              "n_label_tokens": 4 * (part - part // 2)} for _ in range(rows)]
    pq.write_table(pa.Table.from_pylist(table), path)


def measure_memory(args) -> dict:
    """ZeRO-3 versus ZeRO-0 peak RSS per rank, 2 ranks, the same job otherwise."""
    with tempfile.TemporaryDirectory(prefix="orca-bench-memory-") as folder:
        tmp = Path(folder)
        n_params = memory_model(tmp / "base", args.layers)
        steps, micro = 3, 1
        packed_rows(tmp / "packed.parquet", rows=steps * micro * 2, length=256, vocab=MEMORY_ARCH["vocab_size"])
        result = {"parameters": n_params, "layers": args.layers, "ranks": 2, "precision": "fp32",
                  "optimizer_steps": steps, "row_tokens": 256}
        for stage in (0, 3):
            config = tmp / f"zero{stage}.json"
            config.write_text(json.dumps({"zero_optimization": {"stage": stage, **MEMORY_ZERO}, **MEMORY_OPTIMIZER}))
            job = TrainJob(init_dir=tmp / "base", dataset=tmp / "packed.parquet", out_dir=tmp / f"out{stage}",
                           checkpoint_dir=tmp / f"ckpt{stage}", epochs=1, lr=1e-4, max_len=256,
                           micro_batch_size=micro, zero_stage=stage, deepspeed_config=config, checkpoint_every=10**9)
            report = tmp / f"peaks-zero{stage}.json"
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            __file__, "--memory-rank", json.dumps(job.__dict__, default=str), str(report)],
                           cwd=REPO, env={**os.environ, **MEMORY_ENV}, check=True, stdout=subprocess.DEVNULL)
            ranks = [json.loads(Path(f"{report}.{rank}").read_text()) for rank in range(2)]
            result[f"zero{stage}"] = {"peak_rss_gib": ranks, "seconds": round(time.perf_counter() - started, 1)}
            print(f"zero{stage}", json.dumps(result[f"zero{stage}"]), file=sys.stderr, flush=True)
            shutil.rmtree(job.checkpoint_dir)  # ZeRO-0's checkpoint is ~16 bytes a parameter on disk
        for phase in ("train", "with_export"):
            worst = {stage: max(rank[phase] for rank in result[f"zero{stage}"]["peak_rss_gib"]) for stage in (0, 3)}
            result[f"ratio_{phase}"] = round(worst[3] / worst[0], 3)  # the largest rank of each: what a host must fit
            # The same without each rank's floor (torch, transformers, DeepSpeed, gloo: ~1 GiB whatever the model).
            above = {stage: max(rank[phase] - rank["floor"] for rank in result[f"zero{stage}"]["peak_rss_gib"])
                     for stage in (0, 3)}
            result[f"ratio_{phase}_above_floor"] = round(above[3] / above[0], 3)
    return result


def main() -> None:
    if sys.argv[1:2] == ["--memory-rank"]:  # a rank of the memory section, started by torchrun
        memory_rank(sys.argv[2], Path(sys.argv[3]))
        return
    print_json(measure)


def measure() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--memory", action="store_true", help="only the ZeRO-3 versus ZeRO-0 memory section")
    parser.add_argument("--layers", type=int, default=18, help="the memory section's model depth")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", "1")))
    if args.memory:
        return {"memory": measure_memory(args)}
    from orca_core.model import build_base_model

    with tempfile.TemporaryDirectory(prefix="orca-bench-train-") as folder:
        tmp = Path(folder)
        examples = oracle_examples(args.examples)
        texts = [f"{e['system']}\n{e['user']}\n{e['assistant']}" for e in examples]
        tokenizer = train_bpe(texts, 2048, tmp / "tok")
        table, stats = data.build_dataset(examples, tokenizer, args.max_len, "truncate", seed=0)
        pq.write_table(table, tmp / "packed.parquet")
        encoded = [e for e in (data.encode(tokenizer, ex, args.max_len, "truncate") for ex in examples) if e]
        random.Random(0).shuffle(encoded)
        lengths = [len(e["input_ids"]) for e in encoded]
        result = {"packing": {"examples": len(encoded), "packed_rows": stats["rows"],
                              "packed_efficiency": round(stats["packing_efficiency"], 4),
                              "padded_efficiency": round(data.padded_efficiency(lengths, args.micro), 4)}}

        build_base_model(ModelConfig(kind="random_init", architecture=ARCH, tokenizer={"kind": "train_bpe"}),
                         tmp / "tok", tmp / "base", seed=0)
        from transformers import AutoModelForCausalLM

        pad_id = tokenizer.pad_token_id
        rows = table.to_pylist()
        packed = [collate(rows[i:i + args.micro], args.max_len, pad_id) for i in range(0, len(rows), args.micro)]
        padded = padded_batches(encoded, args.micro, pad_id)
        real = lambda batches: sum(int((b["labels"] != -100).sum() + 0) for b in batches)  # noqa: E731
        packed_tokens = sum(len(r["input_ids"]) for r in rows) / len(packed)
        padded_tokens = sum(lengths) / len(padded)
        t_packed = train_step_time(AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32), packed, args.steps)
        t_padded = train_step_time(AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32), padded, args.steps)
        result["packed_vs_padded"] = {
            "packed_real_tokens_per_s": round(packed_tokens / t_packed), "padded_real_tokens_per_s": round(padded_tokens / t_padded),
            "speedup": round((packed_tokens / t_packed) / (padded_tokens / t_padded), 2),
            "label_tokens": {"packed": real(packed), "padded": real(padded)},
        }

        job = TrainJob(init_dir=tmp / "base", dataset=tmp / "packed.parquet", out_dir=tmp / "out",
                       checkpoint_dir=tmp / "ckpt", epochs=1, lr=1e-3, max_len=args.max_len,
                       micro_batch_size=args.micro, zero_stage=2, seed=0, checkpoint_every=10**9,
                       deepspeed_config=Path(__file__).resolve().parents[1] / "infra/deepspeed/zero2.json")
        steps = min(args.steps, len(packed))
        summary = fit(job)
        ds_step = float(np.median([m["seconds"] for m in summary["metrics"][2:steps]]))
        raw_step = train_step_time(AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32), packed[:steps], steps)
        result["deepspeed_overhead"] = {"zero2_step_s": round(ds_step, 4), "torch_step_s": round(raw_step, 4),
                                        "overhead": round(ds_step / raw_step - 1, 3)}
    return result


if __name__ == "__main__":
    main()
