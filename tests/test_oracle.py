"""The oracle teacher: a real server on a free 127.0.0.1 port, hit with the openai SDK and raw HTTP."""

from __future__ import annotations

import ast
import asyncio
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator

import httpx
import openai
import pytest

from orca_core.prompts import STRATEGIES, chat, followup_messages, orca1_system_message
from orca_core.recipe.models import OracleSettings
from orca_core.sources.procedural import generate_suite
from orca_core.sources.schema import to_table, write_table
from orca_oracle.server import create_app, start
from orca_oracle.solver import OracleBook, count_tokens, prompt_tokens
from orca_oracle.state import request_key

FAULTS = ("http_500", "http_503", "timeout", "drop", "malformed", "empty", "content_filter")
QUICK = {"latency_ms": 0, "strategy_penalty": 0}
MODELS = {
    "good": OracleSettings(**QUICK),
    "bad": OracleSettings(**{**QUICK, "error_rate": 1.0}),
    "picky": OracleSettings(**{**QUICK, "strategy_penalty": 1.0}),  # only the suited strategy is reliable
    "shallow": OracleSettings(**{**QUICK, "explain_depth": 0.3}),
    "bare": OracleSettings(**QUICK, trace_lines="bare"),
    "limited": OracleSettings(**{**QUICK, "rpm_limit": 2}),
    "small": OracleSettings(**{**QUICK, "context_window": 20}),
    **{f"fault-{kind}": OracleSettings(**QUICK, faults={kind: 1.0}, timeout_sleep_s=0.5) for kind in FAULTS},
}
KEY = "sk-test-oracle"


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    train, _, _ = generate_suite(None, 12, 0, seed=0)
    return train


def by_task(rows: list[dict], task: str) -> list[dict]:
    return [r for r in rows if r["task_name"] == task]


def _serve(book: OracleBook, api_key: str | None) -> Iterator[str]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner, url = asyncio.run_coroutine_threadsafe(start(create_app(MODELS, book, api_key)), loop).result(10)
    yield url
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture(scope="module")
def url(rows, tmp_path_factory) -> Iterator[str]:
    """Started from a Parquet sources file, as the flow does."""
    path = tmp_path_factory.mktemp("sources") / "train.parquet"
    write_table(to_table(rows), path)
    yield from _serve(OracleBook.from_parquet([path]), None)


@pytest.fixture(scope="module")
def keyed_url(rows) -> Iterator[str]:
    yield from _serve(OracleBook(rows), KEY)


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as client:
        yield client


def post(http: httpx.Client, url: str, model: str, messages: list[dict], **extra) -> httpx.Response:
    return http.post(f"{url}/chat/completions", json={"model": model, "messages": messages, **extra})


def content(http: httpx.Client, url: str, model: str, messages: list[dict]) -> str:
    response = post(http, url, model, messages)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def final_answer(text: str) -> str:
    return re.search(r"So the answer is (.+)\.$", text).group(1)


def strategy(name: str, row: dict) -> list[dict]:
    return chat(STRATEGIES[name].instruction, row["inputs"])


def test_openai_sdk_gets_a_completion_with_usage(url, rows):
    messages = strategy("step-by-step", rows[0])
    sdk = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    result = sdk.chat.completions.create(model="good", messages=messages, max_tokens=512)
    text = result.choices[0].message.content
    assert result.choices[0].finish_reason == "stop" and result.model == "good"
    assert result.usage.prompt_tokens == prompt_tokens(messages) > 0
    assert result.usage.completion_tokens == count_tokens(text) > 0
    assert [m.id for m in sdk.models.list()] == list(MODELS)


def test_step_by_step_shows_the_real_arithmetic(http, url, rows):
    row = next(r for r in by_task(rows, "basic_arithmetic") if "*" in json.loads(r["metadata"])["expression"])
    tree = ast.parse(json.loads(row["metadata"])["expression"], mode="eval")
    product = next(n for n in ast.walk(tree) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Mult))
    a, b = (eval(compile(ast.Expression(side), "<expr>", "eval")) for side in (product.left, product.right))  # noqa: S307
    text = content(http, url, "good", strategy("step-by-step", row))
    assert f"{a} * {b} = {a * b}" in text
    assert len(text.splitlines()) >= 2 and text.endswith(f"So the answer is {row['answer']}.")


def test_direct_answer_is_only_the_gold(http, url, rows):
    for row in rows[::5]:
        assert content(http, url, "good", strategy("direct-answer", row)) == row["answer"]


def test_extract_generate_quotes_the_needle(http, url, rows):
    row = by_task(rows, "needle_haystack")[0]
    text = content(http, url, "good", strategy("extract-generate", row))
    quote = re.match(r'"(.+)"\n', text).group(1)
    assert quote in row["inputs"] and quote.startswith(row["answer"])
    assert text.endswith(f"So the answer is {row['answer']}.")


def test_orca1_styles_differ(http, url, rows):
    plain, mc = by_task(rows, "letter_counting")[0], by_task(rows, "syllogism")[0]
    terse = content(http, url, "good", chat(orca1_system_message(1), plain["inputs"]))
    assert terse.startswith(plain["answer"]) and len(terse.splitlines()) <= 2 and "So the answer is" not in terse
    choice = content(http, url, "good", chat(orca1_system_message(8), mc["inputs"]))
    assert choice.startswith(f"Answer: {mc['answer']}") and "five" in choice
    wrong = [o for o in mc["options"] if o != mc["answer"]]
    assert all(f"- {o} is not right" in choice for o in wrong)
    parts = content(http, url, "good", chat(orca1_system_message(15), plain["inputs"]))
    assert parts.startswith("Part #1: ") and "\nUsage: " in parts
    assert final_answer(choice) == mc["answer"] and final_answer(parts) == plain["answer"]
    detailed = content(http, url, "good", chat(orca1_system_message(3), plain["inputs"]))
    assert len(detailed) > max(len(terse), len(parts))


def test_same_request_same_answer(http, url, rows):
    for model in ("good", "bad"):
        messages = chat(orca1_system_message(7), rows[7]["inputs"])
        assert content(http, url, model, messages) == content(http, url, model, messages)


def test_error_rate_one_gives_wrong_answers(http, url, rows):
    for row in rows[::3]:
        said = final_answer(content(http, url, "bad", strategy("step-by-step", row)))
        assert said != row["answer"]
        if row["options"]:
            assert said in row["options"]


def test_unsuited_strategy_is_penalised(http, url, rows):
    row = by_task(rows, "basic_arithmetic")[0]  # suits step-by-step
    assert content(http, url, "picky", strategy("direct-answer", row)) != row["answer"]
    assert final_answer(content(http, url, "picky", strategy("step-by-step", row))) == row["answer"]


def test_recall_then_generate_takes_two_calls(http, url, rows):
    row, plan = by_task(rows, "base_conversion")[0], STRATEGIES["recall-then-generate"]
    first = content(http, url, "good", followup_messages(plan, row["inputs"], []))
    assert first.startswith("Recalled facts:\n- ") and "So the answer is" not in first
    second = content(http, url, "good", followup_messages(plan, row["inputs"], [first]))
    assert second.endswith(f"So the answer is {row['answer']}.") and "Recalled facts" not in second


def test_explain_depth_writes_less(http, url, rows):
    row = by_task(rows, "leg_counting")[0]
    full = content(http, url, "good", strategy("step-by-step", row))
    short = content(http, url, "shallow", strategy("step-by-step", row))
    assert len(short.splitlines()) < len(full.splitlines()) and final_answer(short) == row["answer"]


def test_unknown_prompt_gets_a_polite_reply(http, url):
    assert "not sure" in content(http, url, "good", chat("", "What is the meaning of life?"))


def test_rate_limit_answers_429_with_retry_after(http, url, rows):
    statuses = [post(http, url, "limited", chat("", r["inputs"])) for r in rows[:3]]
    assert [s.status_code for s in statuses] == [200, 200, 429]
    assert 1 <= int(statuses[2].headers["Retry-After"]) <= 60
    assert statuses[2].json()["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.parametrize("kind", FAULTS)
def test_fault_injection(http, url, rows, kind):
    before = http.get(url.removesuffix("/v1") + "/stats").json()
    messages = chat("", rows[1]["inputs"])
    if kind == "drop":
        with pytest.raises(httpx.RemoteProtocolError):
            post(http, url, f"fault-{kind}", messages)
    elif kind == "timeout":
        with pytest.raises(httpx.ReadTimeout):
            http.post(f"{url}/chat/completions", json={"model": "fault-timeout", "messages": messages}, timeout=0.2)
    else:
        response = post(http, url, f"fault-{kind}", messages)
        expected = {"http_500": 500, "http_503": 503}.get(kind, 200)
        assert response.status_code == expected
        if kind == "malformed":
            with pytest.raises(json.JSONDecodeError):
                response.json()
        elif kind in ("empty", "content_filter"):
            choice = response.json()["choices"][0]
            assert choice["message"]["content"] == ""
            assert choice["finish_reason"] == ("content_filter" if kind == "content_filter" else "stop")
        else:
            assert response.json()["error"]["type"] == "server_error"
    after = http.get(url.removesuffix("/v1") + "/stats").json()
    assert after["faults"].get(kind, 0) == before["faults"].get(kind, 0) + 1
    assert after["ok"] == before["ok"]


def test_api_key_is_required(http, keyed_url, rows):
    messages = chat("", rows[0]["inputs"])
    refused = post(http, keyed_url, "good", messages)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert http.get(f"{keyed_url}/models").status_code == 401
    bearer = http.post(f"{keyed_url}/chat/completions", json={"model": "good", "messages": messages},
                       headers={"Authorization": f"Bearer {KEY}"})
    assert bearer.status_code == 200


def test_azure_path(http, keyed_url, rows):
    azure = keyed_url.removesuffix("/v1") + "/openai/deployments/good/chat/completions?api-version=2024-06-01"
    messages = strategy("direct-answer", rows[0])
    response = http.post(azure, json={"messages": messages}, headers={"api-key": KEY})
    assert response.status_code == 200 and response.json()["model"] == "good"
    assert response.json()["choices"][0]["message"]["content"] == rows[0]["answer"]
    assert http.post(azure, json={"messages": messages}, headers={"api-key": "wrong"}).status_code == 401


def test_stats_count_ok_completions_per_request_id(http, url, rows):
    root = url.removesuffix("/v1")
    http.post(f"{root}/stats/reset")
    body = {"temperature": 0.7, "top_p": 0.95, "max_tokens": 256}
    messages = strategy("step-by-step", rows[2])
    for _ in range(2):
        post(http, url, "good", messages, **body)
    post(http, url, "fault-http_500", messages, **body)
    named = http.post(f"{url}/chat/completions", json={"model": "good", "messages": messages, **body},
                      headers={"X-Client-Request-Id": "the-client-id"})  # the client's own request id wins
    assert named.status_code == 200
    stats = http.get(f"{root}/stats").json()
    key = request_key("good", {"messages": messages, **body})
    assert stats["ok_by_request_id"] == {key: 2, "the-client-id": 1} and stats["ok"] == 3
    assert stats["requests"] == 4 and stats["by_status"] == {"200": 3, "500": 1}


def test_max_tokens_truncates(http, url, rows):
    response = post(http, url, "good", strategy("step-by-step", rows[5]), max_tokens=5).json()
    assert response["choices"][0]["finish_reason"] == "length"
    assert response["usage"]["completion_tokens"] == 5 == count_tokens(response["choices"][0]["message"]["content"])


def test_request_errors(http, url, rows):
    longest = max(rows, key=lambda r: len(r["inputs"]))["inputs"]
    too_long = post(http, url, "small", chat("", longest))
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    unknown = post(http, url, "gpt-nope", chat("", rows[0]["inputs"]))
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    garbage = http.post(f"{url}/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert garbage.status_code == 400 and "error" in garbage.json()


def test_serve_announces_its_url(rows, tmp_path):
    sources, ready = tmp_path / "train.parquet", tmp_path / "ready.txt"
    write_table(to_table(rows), sources)
    code = ("from orca_oracle.server import serve; from orca_core.recipe.models import OracleSettings; "
            f"serve(models={{'good': OracleSettings(latency_ms=0)}}, sources=[{str(sources)!r}], "
            f"ready_file={str(ready)!r})")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline().strip()
        assert re.fullmatch(r"ORACLE_READY http://127\.0\.0\.1:\d+/v1", line)
        url = line.split()[1]
        assert ready.read_text() == url
        messages = strategy("direct-answer", rows[0])
        reply = httpx.post(f"{url}/chat/completions", json={"model": "good", "messages": messages})
        assert reply.json()["choices"][0]["message"]["content"] == rows[0]["answer"]
    finally:
        process.terminate()
        process.wait(10)


def test_multi_digit_additions_are_written_column_by_column():
    from orca_oracle.reasoning import column_addition

    assert column_addition(47, 38) == ["ones: 7 + 8 = 15, write 5, carry 1", "tens: 4 + 3 + 1 = 8, write 8"]
    assert column_addition(95, 87)[-1] == "hundreds: write the carry 1"
    assert column_addition(120, 15) == ["ones: 0 + 5 = 5, write 5", "tens: 2 + 1 = 3, write 3", "hundreds: 1 = 1, write 1"]


def test_serial_families_get_fixed_width_step_traces(http, url, rows):
    shell, coin = by_task(rows, "shell_game"), by_task(rows, "coin_moves")
    for row in shell + coin:
        text = content(http, url, "good", strategy("step-by-step", row))
        *steps, last = text.split("\n")
        assert last == f"So the answer is {row['answer']}."
        meta = json.loads(row["metadata"])
        if row["task_name"] == "shell_game":  # "AB>C": the swap, then the ball's cup after it
            assert steps == [f"{swap}>{cup}" for swap, cup in zip(meta["swaps"], meta["path"])]
            assert all(re.fullmatch(r"[A-E]{2}>[A-E]", s) for s in steps) and len(steps) == 5
        else:  # the move, then the side after it
            assert steps == [m + side for m, side in zip(meta["moves"], meta["sides"])] and len(steps) == 10
            assert all(re.fullmatch(r"[FK][HT]", s) for s in steps) and steps[-1][1] == row["answer"]
    assert content(http, url, "good", strategy("step-by-step", shell[0])) == "\n".join(
        [*(f"{s}>{c}" for s, c in zip(*(json.loads(shell[0]["metadata"])[k] for k in ("swaps", "path")))),
         f"So the answer is {shell[0]['answer']}."])


def test_orca1_explains_what_orca2_answers_directly(http, url, rows):
    # The Orca 2 strategy per family against Orca 1's messages for its sub-collection (cot: 6, 11, 16;
    # flan2021: 3, 4, 7): longer, wrapped, in prose; the steps still there on the serial families.
    largest = by_task(rows, "max_of_two")[0]
    direct = content(http, url, "good", strategy("direct-answer", largest))
    assert direct == largest["answer"]
    for message in (3, 4, 7):
        text = content(http, url, "good", chat(orca1_system_message(message), largest["inputs"]))
        assert final_answer(text) == largest["answer"] and len(text.splitlines()) >= 3 and "digit" in text
    coin = by_task(rows, "coin_moves")[0]
    trace = content(http, url, "good", strategy("step-by-step", coin))
    meta = json.loads(coin["metadata"])
    for message in (6, 11, 16):
        text = content(http, url, "good", chat(orca1_system_message(message), coin["inputs"]))
        assert text != trace and len(text) > len(trace) and final_answer(text) == coin["answer"]
        steps = re.findall(r"\b([FK][HT])\.", text)  # each step a sentence of its own
        assert steps == [m + side for m, side in zip(meta["moves"], meta["sides"])]


def test_bare_trace_lines_keep_a_state_trace_fixed_width_in_every_orca1_style(http, url, rows):
    # trace_lines: bare writes the serial families' steps as Orca 2's trace does, one bare step a line, after
    # each style's own words; what is not a state trace (max_of_two's prose) is written as before.
    messages = [m for m in range(2, 17) if m != 15]  # 1 writes only the last step; 15 maps steps onto parts
    for row in by_task(rows, "shell_game")[:2] + by_task(rows, "coin_moves")[:2]:
        trace = content(http, url, "good", strategy("step-by-step", row)).splitlines()[:-1]
        for message in messages:
            styled = content(http, url, "good", chat(orca1_system_message(message), row["inputs"]))
            bare = content(http, url, "bare", chat(orca1_system_message(message), row["inputs"]))
            lines = bare.splitlines()
            start = lines.index(trace[0])
            assert lines[start:start + len(trace)] == trace, (message, bare)
            assert start > 0 and final_answer(bare) == final_answer(styled) == row["answer"]
            assert not set(trace) <= set(styled.splitlines()), (message, styled)  # styled: numbered or in prose
    largest = by_task(rows, "max_of_two")[0]
    for message in messages:
        system = orca1_system_message(message)
        assert content(http, url, "bare", chat(system, largest["inputs"])) == \
            content(http, url, "good", chat(system, largest["inputs"]))
