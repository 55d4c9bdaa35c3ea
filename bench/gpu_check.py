"""The GPU check (issue 14): the repo's training loop on a ~1B Llama, one GPU, no Ray. Prints JSON.

    bash bench/gpu.sh                                          # on the lent H200 (installs the carried wheels)
    OMP_NUM_THREADS=1 .venv/bin/python bench/gpu_check.py --device cpu --tiny   # the same code, tiny, here

Parts, each in its own process with its own time box (a hung compile or a slow
part cannot eat the whole budget; the GPU's memory is clean for each):
- prepare: a random-init Llama (hidden 2048, 16 layers, 32 heads, vocab 32000:
  ~0.95B parameters) as a stage-0 folder, and the same synthetic examples twice
  as Parquet in the trainer's format: packed (the repo's best-fit packer) and
  padded (one example per row);
- train_<attn>_<layout>: `orca_core.train.fit` (DeepSpeed ZeRO-3, bf16, torch
  AdamW, world of one) for a few steps: real tokens/s after the warm-up steps,
  MFU, peak GPU memory; sdpa and flex_attention on packed rows, sdpa on padded;
- generate: HF `generate` (greedy, batch 32) on the checkpoint the first
  training part exported: generated tokens/s.

MFU counts the model's FLOPs on real tokens: 6 x (matmul parameters: all but
the input embedding and the norms) per token, plus causal attention, 6 x layers
x hidden x s per token of a segment of s tokens (forward and backward of QK^T
and AV, half the square). Padding and cross-segment blocks do no useful work,
so they count for nothing. The peak is the H200's dense bf16 datasheet figure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # orca_core is not installed on the GPU machine
    sys.path.insert(0, str(ROOT))

from json_output import print_json  # noqa: E402  bench/json_output.py: the script's folder is on sys.path

PEAK_BF16_FLOPS = 989e12  # H200 SXM dense bf16, datasheet
PRESETS = {
    "h200": {
        "arch": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                 "intermediate_size": 5632, "max_position_embeddings": 4096},
        "vocab_size": 32000, "max_len": 2048, "micro_batch_size": 8, "steps": 14, "warmup_steps": 3,
        "examples": 1500, "median_length": 320, "gen_batch": 32, "gen_prompt": 128, "gen_new_tokens": 256,
        # seconds per part; the whole check (plus ~20 s of wheel installs) stays under 6 minutes
        "budgets": {"prepare": 45, "train_sdpa_packed": 70, "train_flex_attention_packed": 110,
                    "train_sdpa_padded": 55, "generate": 45},
    },
    "tiny": {
        "arch": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "intermediate_size": 128, "max_position_embeddings": 512},
        "vocab_size": 512, "max_len": 256, "micro_batch_size": 2, "steps": 6, "warmup_steps": 2,
        "examples": 120, "median_length": 40, "gen_batch": 32, "gen_prompt": 16, "gen_new_tokens": 16,
        "budgets": {"prepare": 60, "train_sdpa_packed": 120, "train_flex_attention_packed": 240,
                    "train_sdpa_padded": 120, "generate": 60},
    },
}
TRAIN_PARTS = [("sdpa", "packed"), ("flex_attention", "packed"), ("sdpa", "padded")]


# ---- prepare ---------------------------------------------------------------------------------------------

def example_lengths(preset: dict, rng: np.random.Generator) -> np.ndarray:
    """Chat lengths with a long tail (lognormal around the preset's median), within [16, max_len]."""
    lengths = rng.lognormal(np.log(preset["median_length"]), 0.8, preset["examples"])
    return np.clip(lengths.astype(np.int64), 16, preset["max_len"])


def examples(preset: dict, seed: int = 0) -> list[dict[str, list[int]]]:
    """Random token ids (past the special tokens); the first ~30% of each is the prompt (no labels)."""
    rng = np.random.default_rng(seed)
    out = []
    for length in example_lengths(preset, rng):
        ids = rng.integers(3, preset["vocab_size"], length).tolist()
        n_prompt = max(1, int(length * rng.uniform(0.2, 0.4)))
        out.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})
    return out


def rows_table(rows: list[list[dict[str, list[int]]]]):
    """The trainer's Parquet columns: each row its examples concatenated, position ids restarting at each."""
    import pyarrow as pa

    def joined(row, key):
        return [t for example in row for t in (example[key] if key else range(len(example["input_ids"])))]
    return pa.table({
        "input_ids": [joined(row, "input_ids") for row in rows],
        "labels": [joined(row, "labels") for row in rows],
        "position_ids": [joined(row, None) for row in rows],
    })


def param_counts(model) -> tuple[int, int]:
    """(all parameters, those in matmuls): the input embedding is a lookup and the norms are elementwise."""
    params = sum(p.numel() for p in model.parameters())
    matmul = sum(p.numel() for name, p in model.named_parameters() if p.ndim == 2 and "embed_tokens" not in name)
    return params, matmul


def prepare(preset: dict, device: str, work: Path) -> dict:
    import pyarrow.parquet as pq
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from orca_core.data import pack
    from orca_core.model import generation_config
    from orca_core.tokenizer import train_bpe

    init_dir = work / "init"
    tokenizer = train_bpe([f"sample text {i} for the check" for i in range(50)], 300, init_dir)
    config = LlamaConfig(vocab_size=preset["vocab_size"], pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **preset["arch"])
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of a minute of CPU
        model = LlamaForCausalLM(config)
    params, matmul = param_counts(model)
    model.generation_config = generation_config(tokenizer)
    model.to(torch.bfloat16).save_pretrained(init_dir)  # fit loads it as fp32; bf16 halves the disk time
    del model

    chats = examples(preset)
    lengths = [len(chat["input_ids"]) for chat in chats]
    packed = [[chats[i] for i in row] for row in pack(lengths, preset["max_len"])]
    pq.write_table(rows_table(packed), work / "packed.parquet")
    pq.write_table(rows_table([[chat] for chat in chats]), work / "padded.parquet")
    real = sum(lengths)
    return {
        "params": params, "matmul_params": matmul,
        "examples": len(chats), "tokens": real, "mean_length": round(real / len(chats), 1),
        # per-token mean segment length for the attention term: sum(s^2) / sum(s)
        "attention_span": round(float(np.sum(np.square(lengths, dtype=np.float64)) / real), 1),
        "rows": {"packed": len(packed), "padded": len(chats)},
        "real_token_share": {"packed": round(real / (len(packed) * preset["max_len"]), 4),
                             "padded": round(real / (len(chats) * preset["max_len"]), 4)},
    }


# ---- train -----------------------------------------------------------------------------------------------

def flops_per_token(preset: dict, meta: dict) -> float:
    arch = preset["arch"]
    attention = 6 * arch["num_hidden_layers"] * arch["hidden_size"] * meta["attention_span"]
    return 6 * meta["matmul_params"] + attention


def set_attention(job_kwargs: dict, init_dir: Path, attn: str) -> str:
    """train.py's knob when it has one; else the stage-0 config, which from_pretrained reads."""
    from orca_core.train import TrainJob

    if "attn_implementation" in {f.name for f in dataclasses.fields(TrainJob)}:
        job_kwargs["attn_implementation"] = attn
        return "TrainJob.attn_implementation"
    config_path = init_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["attn_implementation"] = attn
    config_path.write_text(json.dumps(config, indent=2))
    return "config.json attn_implementation (train.py has no knob yet)"


def train(preset: dict, device: str, work: Path, attn: str, layout: str) -> dict:
    import torch

    from orca_core.train import TrainJob, fit

    meta = json.loads((work / "prepare.json").read_text())
    kwargs = {}
    knob = set_attention(kwargs, work / "init", attn)
    name = f"{attn}_{layout}"
    job = TrainJob(
        init_dir=work / "init", dataset=work / f"{layout}.parquet", out_dir=work / f"export_{name}",
        checkpoint_dir=work / f"ckpt_{name}", epochs=1, lr=1e-4, max_len=preset["max_len"],
        micro_batch_size=preset["micro_batch_size"], precision="bf16", zero_stage=3,
        deepspeed_config=ROOT / "infra/deepspeed/zero3_bf16.json", checkpoint_every=10**9,
        max_steps=preset["steps"], **kwargs,
    )
    started = time.perf_counter()
    summary = fit(job)
    wall = time.perf_counter() - started
    timed = summary["metrics"][preset["warmup_steps"]:]
    tokens, seconds = sum(m["tokens"] for m in timed), sum(m["seconds"] for m in timed)
    tokens_per_s = tokens / seconds
    result = {
        "attn_implementation": attn, "attn_knob": knob, "layout": layout,
        "tokens_per_s": round(tokens_per_s, 1),
        "step_seconds_median": round(float(np.median([m["seconds"] for m in timed])), 4),
        "first_step_seconds": round(summary["metrics"][0]["seconds"], 2),
        "steps_timed": len(timed), "tokens_per_step": tokens // len(timed),
        "final_loss": summary["final_loss"], "wall_s": round(wall, 1), "export": summary["out_dir"],
    }
    if device == "cuda":
        result["mfu"] = round(tokens_per_s * flops_per_token(preset, meta) / PEAK_BF16_FLOPS, 4)
        result["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


# ---- generate --------------------------------------------------------------------------------------------

def generate(preset: dict, device: str, work: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    exports = [work / f"export_{attn}_{layout}" for attn, layout in TRAIN_PARTS]
    checkpoint = next((path for path in exports if (path / "config.json").exists()), None)
    if checkpoint is None:
        raise FileNotFoundError("no training part exported a checkpoint")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, attn_implementation="sdpa").to(device)
    model.eval()
    rng = np.random.default_rng(1)
    prompts = torch.tensor(rng.integers(3, preset["vocab_size"], (preset["gen_batch"], preset["gen_prompt"])),
                           device=device)
    n_new = preset["gen_new_tokens"]

    def run(new_tokens: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens)  # random weights: no early eos
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape == (preset["gen_batch"], preset["gen_prompt"] + new_tokens), out.shape
        return time.perf_counter() - started

    run(4)  # warm-up: kernels, allocator
    seconds = run(n_new)
    return {"checkpoint": checkpoint.name, "batch": preset["gen_batch"], "prompt_tokens": preset["gen_prompt"],
            "new_tokens": n_new, "seconds": round(seconds, 2),
            "tokens_per_s": round(preset["gen_batch"] * n_new / seconds, 1)}


# ---- the parts, each in its own process ------------------------------------------------------------------

def run_part(part: str, preset: dict, device: str, work: Path) -> dict:
    if part == "prepare":
        return prepare(preset, device, work)
    if part == "generate":
        return generate(preset, device, work)
    attn, layout = part.removeprefix("train_").rsplit("_", 1)
    return train(preset, device, work, attn, layout)


def spawn(part: str, args: argparse.Namespace, work: Path, timeout: float) -> dict:
    """Run one part in a fresh process group, killed whole (compile workers too) when its time box ends.

    The part writes its result to <work>/<part>.json: native libraries may print on stdout too.
    """
    if timeout < 5:
        return {"error": "skipped: the check's budget is spent"}
    command = [sys.executable, __file__, "--part", part, "--work", str(work), "--device", args.device]
    command += ["--tiny"] if args.tiny else []
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=sys.stderr, start_new_session=True)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = round(time.perf_counter() - started, 1)
    out = work / f"{part}.json"
    if process.returncode != 0 or not out.exists():
        reason = json.loads(out.read_text())["error"] if out.exists() else "no result"
        return {"error": f"exit code {process.returncode}: {reason}", "part_wall_s": wall}
    return {**json.loads(out.read_text()), "part_wall_s": wall}


def orchestrate(args: argparse.Namespace) -> dict:
    import torch

    preset = PRESETS["tiny" if args.tiny else "h200"]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU (use --device cpu --tiny off the GPU machine)")
    started = time.perf_counter()
    deadline = started + args.budget
    work = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=args.work_root))
    result: dict = {"preset": "tiny" if args.tiny else "h200", "device": args.device,
                    "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                    "versions": versions(), "work": str(work)}
    parts = {}
    for part, box in preset["budgets"].items():
        if "error" in parts.get("prepare", {}):
            parts[part] = {"error": "skipped: prepare failed"}
        else:
            parts[part] = spawn(part, args, work, min(box, deadline - time.perf_counter()))
    meta = parts.pop("prepare")
    result["model"] = {**preset["arch"], "vocab_size": preset["vocab_size"], **{k: meta.get(k) for k in
                                                                                   ("params", "matmul_params")}}
    result["data"] = {k: v for k, v in meta.items() if k not in ("params", "matmul_params")}
    if "error" not in meta:
        result["flops_per_token"] = round(flops_per_token(preset, meta))
    result["peak_flops"] = PEAK_BF16_FLOPS
    result["train"] = {part.removeprefix("train_"): parts[part] for part in parts if part.startswith("train_")}
    packed, padded = result["train"]["sdpa_packed"], result["train"]["sdpa_padded"]
    if "tokens_per_s" in packed and "tokens_per_s" in padded:
        result["packed_vs_padded_sdpa"] = round(packed["tokens_per_s"] / padded["tokens_per_s"], 3)
    result["generate"] = parts["generate"]
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "deepspeed", "pydantic"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny config: the same code in seconds on CPU")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds for all parts together")
    parser.add_argument("--work-root", default=None, help="where the models and data go (default: $TMPDIR)")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cpu":  # the CPU path on any machine, the GPU one included
        os.environ.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    if args.part:
        preset = PRESETS["tiny" if args.tiny else "h200"]
        out = args.work / f"{args.part}.json"
        try:
            with contextlib.redirect_stdout(sys.stderr):
                out.write_text(json.dumps(run_part(args.part, preset, args.device, args.work)))
        except Exception as exc:  # the reason goes into the JSON; the traceback to stderr
            out.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:400]}))
            raise
    else:
        print_json(lambda: orchestrate(args))


if __name__ == "__main__":
    main()
