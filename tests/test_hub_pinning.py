"""Hub inputs pinned to commits: the key holds the commit a hub name resolves to, and the load uses it.

The Hub is faked at the edge: a real HTTP server on 127.0.0.1 that speaks the
part of the Hub API huggingface_hub uses here (repo info at a revision, file
downloads), with branches that can be moved.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import huggingface_hub.constants
import pytest

from orca_core import hub
from orca_core.eval import steps as evaluation
from orca_core.hub import HubPinError
from orca_core.keys import diff_components
from orca_core.recipe import RecipeError, load_recipe
from orca_core.steps import BASE_MODEL, SOURCES, TOKENIZER, components, plan_key

INFO = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+)(?:/revision/([^/]+))?$")
RESOLVE = re.compile(r"^/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class FakeHub:
    """Repositories with commits and movable branches/tags, served over the Hub's HTTP API."""

    def __init__(self) -> None:
        self.refs: dict[tuple[str, str], dict[str, str]] = {}  # (kind, repo) -> {branch or tag: commit}
        self.files: dict[str, dict[str, bytes]] = {}  # commit -> {path: content}
        self.repo_of: dict[str, tuple[str, str]] = {}  # commit -> (kind, repo): old commits stay reachable
        self.requests: list[str] = []  # "METHOD path" of repo-info and file requests, in order (not the library's own)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def commit(self, kind: str, repo: str, files: dict[str, bytes] | None = None, ref: str = "main") -> str:
        """A new commit of `repo`; `ref` now points at it (the branch moves). Returns its sha."""
        sha = hashlib.sha1(f"{kind}/{repo}/{len(self.files)}".encode()).hexdigest()
        self.files[sha], self.repo_of[sha] = files or {}, (kind, repo)
        self.refs.setdefault((kind, repo), {})[ref] = sha
        return sha

    def asked(self, prefix: str) -> list[str]:
        return [r for r in self.requests if r.split(" ", 1)[1].startswith(prefix)]

    def _sha(self, kind: str, repo: str, revision: str) -> str | None:
        if self.repo_of.get(revision) == (kind, repo):
            return revision
        return self.refs.get((kind, repo), {}).get(revision)

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._answer(body=True)

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def _answer(self, body: bool) -> None:
                path = self.path.split("?", 1)[0]
                if INFO.match(path) or RESOLVE.match(path):
                    fake.requests.append(f"{self.command} {path}")
                if match := INFO.match(path):
                    kind, repo, revision = match.group(1)[:-1], match.group(2), unquote(match.group(3) or "main")
                    self._info(kind, repo, revision)
                elif match := RESOLVE.match(path):
                    kind = "dataset" if match.group(1) else "model"
                    self._file(kind, match.group(2), unquote(match.group(3)), unquote(match.group(4)), body)
                else:
                    self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"})

            def _info(self, kind: str, repo: str, revision: str) -> None:
                if (kind, repo) not in fake.refs:
                    self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
                elif (sha := fake._sha(kind, repo, revision)) is None:
                    self._send(404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"})
                else:
                    siblings = [{"rfilename": name} for name in fake.files[sha]]
                    self._send(200, json.dumps({"id": repo, "sha": sha, "siblings": siblings}).encode())

            def _file(self, kind: str, repo: str, revision: str, name: str, body: bool) -> None:
                sha = fake._sha(kind, repo, revision)
                content = fake.files.get(sha or "", {}).get(name)
                if content is None:
                    self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"}, body)
                    return
                headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(content).hexdigest()}"'}
                self._send(200, content, headers, body)

            def _send(self, status: int, content: bytes, headers: dict | None = None, body: bool = True) -> None:
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                if body:
                    self.wfile.write(content)

            def log_message(self, *args) -> None:  # quiet
                pass

        return Handler

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def fresh_resolutions():
    hub.forget_resolved()  # each test reads branches anew
    yield
    hub.forget_resolved()


@pytest.fixture
def fake_hub(monkeypatch):
    with FakeHub() as fake:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", fake.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield fake


@pytest.fixture
def no_hub(monkeypatch):
    """An endpoint where nothing listens: any call to the Hub fails to connect."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def flan_hub(*extra: str):
    return load_recipe("smoke", ["sources.flan={dataset: org/flan-v2}", *extra])


def pretrained(*extra: str):
    return load_recipe("smoke", ["model.kind=pretrained", "model.path=org/base", "model.architecture={}",
                                 "model.tokenizer={kind: pretrained, path: org/base}", *extra])


COMMIT = "0123456789abcdef0123456789abcdef01234567"


# -- the sources step (sources.flan.dataset) ----------------------------------------------------
def test_the_sources_key_holds_the_commit_the_branch_resolves_to(fake_hub):
    sha = fake_hub.commit("dataset", "org/flan-v2")
    comps = components(SOURCES, flan_hub())
    assert comps["config"]["sources"]["flan"]["dataset"] == "org/flan-v2"
    assert comps["config"]["sources"]["flan"]["revision"] == sha
    assert fake_hub.requests == ["GET /api/datasets/org/flan-v2"]  # no revision: the default branch
    plan_key(SOURCES, flan_hub())
    assert len(fake_hub.requests) == 1  # resolved once per process


def test_moving_the_branch_changes_the_key_and_the_diff_names_the_revision(fake_hub):
    first = fake_hub.commit("dataset", "org/flan-v2")
    before = components(SOURCES, flan_hub())
    second = fake_hub.commit("dataset", "org/flan-v2")  # someone pushed: main moved
    assert components(SOURCES, flan_hub()) == before  # this process keeps the commit it planned with
    hub.forget_resolved()  # a new run, a new process
    after = components(SOURCES, flan_hub())
    assert diff_components(before, after) == [("config.sources.flan.revision", first, second)]


def test_a_branch_or_tag_pin_resolves_through_the_hub_and_a_commit_pin_keys_like_its_branch(fake_hub):
    main = fake_hub.commit("dataset", "org/flan-v2")
    tagged = fake_hub.commit("dataset", "org/flan-v2", ref="v2.0")
    by_tag = components(SOURCES, flan_hub("sources.flan.revision=v2.0"))
    assert by_tag["config"]["sources"]["flan"]["revision"] == tagged
    assert fake_hub.requests == ["GET /api/datasets/org/flan-v2/revision/v2.0"]
    # Pinning the commit `main` points at is the same artifact as following main today.
    assert plan_key(SOURCES, flan_hub(f"sources.flan.revision={main}")) == plan_key(SOURCES, flan_hub())


def test_a_commit_pin_needs_no_hub(no_hub, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    comps = components(SOURCES, flan_hub(f"sources.flan.revision={COMMIT}"))
    assert comps["config"]["sources"]["flan"]["revision"] == COMMIT


def test_offline_and_unpinned_is_an_error_naming_the_field(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPinError) as caught:
        plan_key(SOURCES, flan_hub())
    assert str(caught.value) == (
        "sources.flan.dataset: 'org/flan-v2' is a hub name without a pinned revision and the hub cannot be reached "
        "(offline); pin `sources.flan.revision: <commit>` or use a local path")
    with pytest.raises(HubPinError, match=r"^sources\.flan\.dataset: 'org/flan-v2' is a hub name whose revision "
                                          r"'main' is not a commit and the hub cannot be reached \(offline\)"):
        plan_key(SOURCES, flan_hub("sources.flan.revision=main"))


def test_hf_hub_offline_in_the_environment_is_honoured(python, tmp_path):
    code = ("from orca_core.recipe import load_recipe\n"
            "from orca_core.hub import HubPinError\n"
            "recipe = load_recipe('smoke', ['sources.flan={dataset: org/flan-v2}'])\n"
            "try:\n    recipe.sources.flan.hub_commit()\nexcept HubPinError as error:\n    print(error)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, env=env, timeout=120)
    assert "the hub cannot be reached (offline); pin `sources.flan.revision: <commit>`" in out.stdout


def test_no_route_to_the_hub_is_the_same_error_with_its_cause(no_hub):
    with pytest.raises(HubPinError, match=r"^sources\.flan\.dataset: 'org/flan-v2' is a hub name without a pinned "
                                          r"revision and the hub cannot be reached \(\w*Connect\w*"):
        plan_key(SOURCES, flan_hub())


def test_unknown_repos_and_revisions_name_the_field(fake_hub):
    fake_hub.commit("dataset", "org/flan-v2")
    with pytest.raises(HubPinError, match=r"^sources\.flan\.revision: 'v9' is no branch, tag or commit of the "
                                          r"hub dataset 'org/flan-v2'$"):
        plan_key(SOURCES, flan_hub("sources.flan.revision=v9"))
    with pytest.raises(HubPinError, match=r"^sources\.flan\.dataset: no hub dataset 'org/nothing'"):
        plan_key(SOURCES, load_recipe("smoke", ["sources.flan={dataset: org/nothing}"]))


def test_a_local_dataset_folder_never_touches_the_hub(fake_hub, tmp_path):
    folder = tmp_path / "org" / "flan-v2"
    folder.mkdir(parents=True)
    (folder / "data.arrow").write_bytes(b"rows")
    recipe = load_recipe("smoke", [f"sources.flan={{dataset: {folder}}}"])
    comps = components(SOURCES, recipe)
    assert comps["config"]["sources"]["flan"]["dataset"] == "<local folder>"
    assert "revision" not in comps["config"]["sources"]["flan"]
    assert comps["inputs"]["flan_files"] == [hashlib.sha256(b"rows").hexdigest()]
    assert fake_hub.requests == []
    with pytest.raises(HubPinError, match=r"^sources\.flan\.revision: 'main' pins a hub name, but "
                                          r"sources\.flan\.dataset '.*' is a local path"):
        plan_key(SOURCES, load_recipe("smoke", [f"sources.flan={{dataset: {folder}, revision: main}}"]))


# -- the model and its tokenizer (model.path, model.tokenizer.path) -------------------------------
def test_base_model_and_tokenizer_keys_hold_their_commits(fake_hub):
    main = fake_hub.commit("model", "org/base")
    tagged = fake_hub.commit("model", "org/base", ref="v1")
    recipe = pretrained("model.tokenizer.revision=v1")
    assert components(TOKENIZER, recipe)["config"]["tokenizer"]["revision"] == tagged
    base = components(BASE_MODEL, recipe)
    assert base["config"]["model"]["revision"] == main
    assert base["upstream"]["tokenizer"] == plan_key(TOKENIZER, recipe)
    assert sorted(fake_hub.requests) == ["GET /api/models/org/base", "GET /api/models/org/base/revision/v1"]


def test_offline_unpinned_model_names_model_path(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    recipe = pretrained(f"model.tokenizer.revision={COMMIT}")
    assert components(TOKENIZER, recipe)["config"]["tokenizer"]["revision"] == COMMIT
    with pytest.raises(HubPinError, match=r"^model\.path: 'org/base' is a hub name without a pinned revision .*"
                                          r"pin `model\.revision: <commit>`"):
        plan_key(BASE_MODEL, recipe)


def test_the_tokenizer_is_loaded_at_the_commit_it_is_keyed_on(fake_hub, python, tmp_path):
    """A real download through transformers (in a child: the endpoint is read at import): the old commit's files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def tokenizer_files(words: list[str]) -> dict[str, bytes]:
        bpe = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
        bpe.pre_tokenizer = pre_tokenizers.Whitespace()
        folder = tmp_path / f"tok-{len(words)}"
        PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="[UNK]").save_pretrained(folder)
        return {p.name: p.read_bytes() for p in folder.iterdir()}

    keyed = fake_hub.commit("model", "org/tok", tokenizer_files(["alpha", "beta"]))
    child = ("import json, sys\n"
             "from orca_core.recipe import load_recipe\n"
             "from orca_core import curriculum\n"
             "from pathlib import Path\n"
             "recipe = load_recipe('smoke', ['model.tokenizer={kind: pretrained, path: org/tok}'])\n"
             "commit = curriculum.tokenizer_reads(recipe)['tokenizer']['revision']  # planning\n"
             "sys.stdin.readline()  # the branch moves while the run builds\n"
             "rows, stats = curriculum.build_tokenizer(recipe, {}, Path(sys.argv[1]), None)\n"
             "print(json.dumps({'commit': commit, 'vocab': rows['vocab']}))\n")
    env = {**os.environ, "HF_ENDPOINT": fake_hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    (tmp_path / "out").mkdir()
    proc = subprocess.Popen([python, "-c", child, str(tmp_path / "out")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not fake_hub.asked("/api/models/org/tok") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    fake_hub.commit("model", "org/tok", tokenizer_files(["alpha", "beta", "gamma", "delta"]))  # main moves on
    out, err = proc.communicate("go\n", timeout=180)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["commit"] == keyed
    assert result["vocab"] == 3 + 3  # [UNK] alpha beta + the ChatML tokens: the keyed commit's vocabulary
    downloads = [r for r in fake_hub.requests if "/resolve/" in r]
    assert downloads and all(f"/org/tok/resolve/{keyed}/" in r for r in downloads), downloads


# -- eval benchmarks (eval.benchmarks[].dataset) ------------------------------------------------
def test_a_hub_benchmark_is_keyed_by_its_commit_and_a_local_one_is_not(fake_hub):
    sha = fake_hub.commit("dataset", "openai/gsm8k")
    recipe = load_recipe("smoke", ["eval.suite=custom", "eval.benchmarks=[{name: gsm8k, dataset: openai/gsm8k, "
                                   "subset: main, split: test}]"])
    spec = evaluation.eval_reads(recipe)["eval"]["benchmarks"][0]
    assert spec["dataset"] == "openai/gsm8k" and spec["revision"] == sha
    heldout = evaluation.eval_reads(load_recipe("smoke"))["eval"]["benchmarks"]
    assert heldout and all("revision" not in s for s in heldout)


def test_offline_unpinned_benchmark_names_its_field(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    recipe = load_recipe("smoke", ["eval.suite=custom", "eval.benchmarks=[{name: gsm8k, dataset: openai/gsm8k}]"])
    with pytest.raises(HubPinError, match=r"^eval\.benchmarks\[gsm8k\]\.dataset: 'openai/gsm8k' is a hub name "
                                          r"without a pinned revision .* pin `eval\.benchmarks\[gsm8k\]\.revision"):
        evaluation.eval_reads(recipe)


# -- the recipe: pins are validated data; nothing resolves at validation ----------------------------
def test_recipes_validate_offline_and_embedded_keys_have_no_revision(monkeypatch, no_hub):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    production = load_recipe("orca2-7b")  # hub names, unpinned: resolved at planning, not here
    assert production.model.path == "meta-llama/Llama-2-7b-hf" and production.model.revision is None
    for name in ("tiny", "smoke"):
        recipe = load_recipe(name)
        keys: dict[str, str] = {}
        for step in (SOURCES, TOKENIZER, BASE_MODEL):
            assert "revision" not in json.dumps(components(step, recipe, keys)), (name, step.name)


@pytest.mark.parametrize("override, field", [
    ("sources.flan={paths: [a.parquet], revision: main}", "sources.flan"),
    ("model.revision=main", "model"),
    ("model.tokenizer.revision=main", "model.tokenizer"),
    ("eval.benchmarks=[{name: gsm8k, path: x.jsonl, revision: main}]", "eval.benchmarks[0]"),
])
def test_a_revision_without_a_hub_name_is_a_recipe_error(override, field):
    extra = ["eval.suite=custom"] if override.startswith("eval") else []
    with pytest.raises(RecipeError, match=rf"(?m)^  {re.escape(field)}: .*revision"):
        load_recipe("smoke", [*extra, override])
