"""The vLLM child process of `backends.generate_jobs`: one engine load, then each job in turn.

    python -m orca_core.eval.vllm_generate REQUEST.json

The request names the checkpoint, the output folder, the settings, the model's
context and the jobs' prompt token ids. Each finished job is written to
`out_dir/<job>.jsonl` (atomically, by `backends.write_job`) and announced with
one `ORCA_EVAL_JOB {...}` line; jobs already written are skipped. The parent
reads the files, never this process's output, which vLLM also logs to.
The `__main__` guard matters: vLLM may start worker processes that import this module.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from orca_core.eval.backends import (
    CHUNK_MARK,
    JOB_MARK,
    LOAD_MARK,
    Generation,
    GenerationSettings,
    finish,
    load_tokenizer,
    run_jobs,
    token_cap,
    too_long,
)


class VllmEngine:
    """vLLM's offline `LLM` engine, greedy. Also what the Ray engine actors run (tasks/eval_ray.py).

    `executor`: vLLM's distributed_executor_backend ("ray" for tensor parallelism over the GPU bundles
    of the actor's placement group); None lets vLLM choose (this child: one process, or its own workers).
    """

    engines = 1

    def __init__(self, checkpoint: Path, settings: GenerationSettings, context: int, executor: str | None = None):
        import torch
        from vllm import LLM

        self.settings, self.context = settings, context
        self.tokenizer = load_tokenizer(checkpoint)
        self.eos = self.tokenizer.eos_token_id
        self.llm = LLM(
            model=str(checkpoint), tokenizer=str(checkpoint), dtype=settings.dtype, max_model_len=context,
            tensor_parallel_size=settings.tensor_parallel_size, seed=0, distributed_executor_backend=executor,
            enforce_eager=not torch.cuda.is_available(),  # CPU: no graph capture or compilation to wait for
        )

    def generate(self, prompts: list[list[int]]) -> list[Generation]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        caps = [token_cap(len(p), self.context, self.settings.max_new_tokens) for p in prompts]
        live = [i for i, cap in enumerate(caps) if cap is not None]
        out: list[Generation] = [too_long(len(p)) for p in prompts]
        if not live:
            return out
        params = [SamplingParams(temperature=0.0, max_tokens=caps[i], stop_token_ids=[self.eos], detokenize=False,
                                 skip_special_tokens=True) for i in live]
        results = self.llm.generate([TokensPrompt(prompt_token_ids=prompts[i]) for i in live], params, use_tqdm=False)
        for i, result in zip(live, results, strict=True):
            out[i] = finish(self.tokenizer, len(prompts[i]), result.outputs[0].token_ids, caps[i], self.eos)
        return out


def announce(mark: str, payload: dict) -> None:
    print(mark + json.dumps(payload), file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    request = json.loads(Path(argv[0]).read_text())
    checkpoint, out_dir = Path(request["checkpoint"]), Path(request["out_dir"])
    settings = GenerationSettings(**request["settings"])
    started = time.perf_counter()
    engine = VllmEngine(checkpoint, settings, int(request["context"]))
    announce(LOAD_MARK, {"seconds": round(time.perf_counter() - started, 3)})
    run_jobs(engine, request["jobs"], out_dir, request["fingerprints"],
             lambda info: announce(JOB_MARK, {**asdict(info), "seconds": round(info.seconds, 3)}),
             lambda job, done, total: announce(CHUNK_MARK, {"job": job, "done": done, "total": total}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
