"""Training figures on this machine. Prints JSON.

    OMP_NUM_THREADS=1 .venv/bin/python bench/train.py [--examples 1500] [--steps 30]

- packing: real-token share of packed rows (best-fit-decreasing) versus batches padded to
  their longest example, on the same oracle traces (target >= 0.98);
- packed_vs_padded: real tokens/s training on packed rows versus padded batches, same
  model and optimizer, raw torch (target >= 1.8x);
- deepspeed_overhead: step time of DeepSpeed ZeRO-2 (one worker) versus a raw torch AdamW
  loop on the same model and packed batches (target <= 10 %).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
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


def main() -> None:
    print_json(measure)


def measure() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--micro", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", "1")))
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
