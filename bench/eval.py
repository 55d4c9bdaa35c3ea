"""Generation figures of the evaluation backends on this machine. Prints JSON.

    .venv/bin/python bench/eval.py [--checkpoint DIR] [--prompts 64] [--max-new-tokens 64] [--batch-size 32]

The same checkpoint and chat prompts through `backends.generate_jobs` three ways:
vLLM (its child process), HF batched (left padding, `--batch-size`), and HF one
prompt at a time (batch size 1, the naive loop). Per backend: load_s (engine or
model load; for vLLM the child's import of vllm and its engine start), generate_s
(generation wall time), tokens (generated, eos excluded), tokens_per_s (tokens /
generate_s), total_s (the whole call: child start, imports, load, generation) and
prompts; `identical` says whether all three gave the same token ids.

Without --checkpoint it builds the tiny recipe's student (random init, its
architecture, a BPE trained on the prompts): every prompt then runs to
max_new_tokens, which makes the figures a clean throughput measure. Prompts are
the procedural held-out questions of runs/sources/*/heldout.parquet when a
`make run` left one, else generated arithmetic questions.
"""

from __future__ import annotations

import argparse
import glob
import random
import tempfile
import time
from pathlib import Path

from json_output import print_json  # bench/json_output.py: the script's folder is on sys.path

REPO = Path(__file__).resolve().parents[1]


def questions(n: int, sources: str | None) -> tuple[list[str], str]:
    """`n` user prompts spread over the held-out tasks, or generated ones when there is no sources artifact."""
    import pyarrow.parquet as pq

    files = sorted(glob.glob(sources or str(REPO / "runs/sources/*/heldout.parquet")))
    if files:
        rows = pq.read_table(files[0], columns=["inputs"])["inputs"].to_pylist()
        step = max(1, len(rows) // n)
        return rows[::step][:n], files[0]
    rng = random.Random(0)
    return [f"Calculate {rng.randrange(1000)} + {rng.randrange(1000)} * {rng.randrange(100)}." + " Explain." * rng.randrange(8)
            for _ in range(n)], "generated"


def tiny_checkpoint(folder: Path, texts: list[str]) -> tuple[Path, dict]:
    """The tiny recipe's student, random init, with a BPE trained on the prompts."""
    from orca_core.model import build_base_model
    from orca_core.recipe import load_recipe
    from orca_core.tokenizer import train_bpe

    model_cfg = load_recipe("tiny").model
    train_bpe(texts, model_cfg.tokenizer.vocab_size, folder / "tok")
    build_base_model(model_cfg, folder / "tok", folder / "model", seed=0)
    return folder / "model", dict(model_cfg.architecture)


def main() -> None:
    print_json(measure)


def measure() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="an HF model folder (e.g. runs/train-orca2/<key>)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="HF batched")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--sources", help="a heldout.parquet (glob) to take prompts from")
    args = parser.parse_args()
    import torch

    from orca_core.eval.backends import GenerationSettings, backend_version, chat_prompts, generate_jobs
    from orca_core.prompts import student_chat

    with tempfile.TemporaryDirectory(prefix="orca-bench-eval-") as scratch:
        tmp = Path(scratch)
        users, origin = questions(args.prompts, args.sources)
        checkpoint, architecture = args.checkpoint, None
        if checkpoint is None:
            checkpoint, architecture = tiny_checkpoint(tmp, users)
        ids = chat_prompts(checkpoint, [student_chat("", user) for user in users])
        result: dict = {
            "checkpoint": str(args.checkpoint) if args.checkpoint else "tiny recipe student (random init)",
            "architecture": architecture, "prompts_from": origin, "prompts": len(ids),
            "prompt_tokens_mean": round(sum(map(len, ids)) / len(ids), 1), "max_new_tokens": args.max_new_tokens,
            "torch_threads": torch.get_num_threads(), "backends": {},
        }
        runs = {
            "vllm": GenerationSettings(backend="vllm", max_new_tokens=args.max_new_tokens, dtype=args.dtype),
            "hf-batched": GenerationSettings(backend="hf", max_new_tokens=args.max_new_tokens, dtype=args.dtype,
                                             batch_size=args.batch_size),
            "hf-single": GenerationSettings(backend="hf", max_new_tokens=args.max_new_tokens, dtype=args.dtype,
                                            batch_size=1),
        }
        outputs = {}
        for name, settings in runs.items():
            stats: dict = {}
            started = time.perf_counter()
            generated = generate_jobs(checkpoint, {"bench": ids}, tmp / name, settings, stats=stats)["bench"]
            total = time.perf_counter() - started
            outputs[name] = [g.token_ids for g in generated]
            result["backends"][name] = {
                "version": backend_version(settings), "batch_size": settings.batch_size if settings.backend == "hf" else None,
                "load_s": round(stats["load_s"], 2), "generate_s": round(stats["generate_s"], 2), "tokens": stats["tokens"],
                "tokens_per_s": round(stats["tokens"] / stats["generate_s"], 1), "total_s": round(total, 2),
                "prompts": stats["prompts"], "stopped_at_eos": sum(g.finish_reason == "stop" for g in generated),
            }
        reference = outputs["vllm"]
        result["identical"] = all(out == reference for out in outputs.values())
        result["differing_prompts"] = {name: sum(a != b for a, b in zip(out, reference)) for name, out in outputs.items()
                                       if name != "vllm"}
        hf = result["backends"]
        result["speedup_vs_hf_single"] = {name: round(hf[name]["tokens_per_s"] / hf["hf-single"]["tokens_per_s"], 2)
                                          for name in ("vllm", "hf-batched")}
    return result


if __name__ == "__main__":
    main()
