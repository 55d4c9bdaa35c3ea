"""The artifact store: `<root>/<step>/<key>/` folders, published atomically.

Each artifact holds the step's files plus
- `key.json`: every component of the step key (readable, enough to rebuild it),
- `manifest.json`: every file with size and sha256, row counts and stats.
  Written last: an artifact without a manifest does not exist.

The root is any fsspec URL. On a local root a step writes into a staging
folder under `<root>/.staging/` and publishing is one `rename` (atomic: a
kill at any moment leaves either no artifact or a whole one).

Object stores (s3://...) have no rename. There each publish uploads its files
under its own attempt prefix, `<step>/<key>/.attempts/<uuid>/`, then commits
by writing `<step>/<key>/manifest.json` with a conditional put (`If-None-Match:
*`), the manifest naming its attempt (`files_at`). Readers see a whole
artifact or none; two writers of one key never touch each other's uploads:
one manifest wins, the loser deletes only its own attempt. A server that
ignores the condition overwrites instead, so every commit is read back to
learn whose manifest stands (last writer wins; the other backs off). An
attempt without a manifest (an upload in progress, or a killed writer) is not
an artifact; a publish of the key removes attempts whose newest object is
older than `ABANDONED_ATTEMPT_S` (a killed writer's: an upload in progress is
never that old).

A cache hit needs the manifest to verify against the files; a corrupt
artifact is moved aside (local) or uncommitted (remote: the manifest goes to
`.corrupt/`, the files stay for inspection), logged, and rebuilt.

Two runs that need the same artifact at once (two flows on one store) take
turns through a per-artifact lock (`lock`): the second waits, then finds the
first one's artifact instead of building (and paying for) it again.

Credentials and endpoints of object stores come from the environment, the
way their SDKs read it (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL, AWS_REGION), so every process (Ray workers included) that
inherits it reaches the same store; recipes never hold secrets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fsspec
from filelock import FileLock, Timeout
from fsspec.implementations.local import LocalFileSystem

from orca_core.keys import canonical_json, file_sha256, sha256_text

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
KEY_FILE = "key.json"
ATTEMPTS = ".attempts"
ABANDONED_ATTEMPT_S = 24 * 3600.0  # an attempt whose newest object is this old is a killed writer's
MANIFEST_SCHEMA = 1


class CorruptArtifact(Exception):
    """An artifact whose manifest is unreadable, or does not match its files."""


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) of a store URL: a local path or any fsspec URL.

    Object stores get no listing cache: other processes (fan-out actors, other runs)
    add files all the time, and a stale listing would miss them.
    """
    protocol = fsspec.core.split_protocol(str(url))[0]
    if protocol in (None, "file", "local"):
        return fsspec.core.url_to_fs(str(url))
    return fsspec.core.url_to_fs(str(url), use_listings_cache=False)


@dataclass(frozen=True)
class ArtifactRef:
    """A small, picklable handle to a published artifact (what Prefect tasks return)."""

    step: str
    key: str
    url: str  # the folder holding the artifact's files, as a URL of the store's filesystem

    def file(self, name: str) -> str:
        return f"{self.url}/{name}"


class ArtifactStore:
    def __init__(self, root: str, verify: str = "sha256"):
        self.fs, path = filesystem(root)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = str(Path(path).resolve()) if self.is_local else path.rstrip("/")
        self.protocol = "" if self.is_local else (self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0])
        self.verify = verify

    # -- concurrency -------------------------------------------------------------
    @contextmanager
    def lock(self, step: str, key: str) -> Iterator[None]:
        """Hold the build of `<step>/<key>`; another process wanting it waits here.

        Local (and NFS/Lustre-mounted) roots use a lock file under `<root>/.locks/`; object stores
        have no locks, and there two concurrent builders both build; the first manifest wins and
        the other publish returns it.
        """
        if not self.is_local:
            yield
            return
        folder = Path(self.root, ".locks")
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / f"{step}-{key}.lock"))
        try:
            lock.acquire(blocking=False)
        except Timeout:
            log.info("%s/%s is being built by another run; waiting for it", step, key[:12])
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    # -- addresses ---------------------------------------------------------------
    def url(self, *parts: str) -> str:
        path = "/".join([self.root, *parts])
        return path if self.is_local else f"{self.protocol}://{path}"

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _files_at(self, step: str, key: str, manifest: dict[str, Any]) -> list[str]:
        """Path parts of the folder holding an artifact's files (an attempt prefix on object stores)."""
        return [step, key, manifest["files_at"]] if manifest.get("files_at") else [step, key]

    def ref(self, step: str, key: str, manifest: dict[str, Any] | None = None) -> ArtifactRef:
        if self.is_local:
            return ArtifactRef(step, key, self.url(step, key))
        if manifest is None:
            try:
                manifest = self.read_json(step, key, MANIFEST)
            except FileNotFoundError:
                manifest = {}
        return ArtifactRef(step, key, self.url(*self._files_at(step, key, manifest)))

    def work_folder(self, name: str) -> Path:
        """A local folder that outlives a step's retries (training checkpoints, generations in flight).

        Inside the store when it is local; beside it on this machine when the store is remote.
        """
        if self.is_local:
            return Path(self.root, name)
        return Path(tempfile.gettempdir(), "orca-work", sha256_text(self.url())[:12], name)

    # -- reading -----------------------------------------------------------------
    def keys(self, step: str) -> list[str]:
        """Keys of the published (manifest present) artifacts of a step."""
        folder = self._path(step)
        if not self.fs.exists(folder):
            return []
        found = []
        for entry in self.fs.ls(folder, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if not name.startswith(".") and self.fs.exists(f"{folder}/{name}/{MANIFEST}"):
                found.append(name)
        return sorted(found)

    def read_json(self, step: str, key: str, name: str) -> dict[str, Any]:
        """`manifest.json`, or a JSON file of the artifact (found where the manifest says)."""
        if name == MANIFEST:
            return json.loads(self.fs.cat_file(self._path(step, key, MANIFEST)))
        manifest = {} if self.is_local else self.read_json(step, key, MANIFEST)
        return json.loads(self.fs.cat_file(self._path(*self._files_at(step, key, manifest), name)))

    def manifest(self, ref: ArtifactRef) -> dict[str, Any]:
        return self.read_json(ref.step, ref.key, MANIFEST)

    def check(self, step: str, key: str) -> str:
        """'ok', 'absent', or 'corrupt: <reason>' — reads only, changes nothing."""
        return self._checked(step, key)[0]

    def _checked(self, step: str, key: str) -> tuple[str, bytes | None]:
        """(status, the manifest's bytes when it could be read)."""
        if self.is_local and not self.fs.exists(self._path(step, key)):
            return "absent", None
        try:
            raw = self.fs.cat_file(self._path(step, key, MANIFEST))
        except FileNotFoundError:
            # Local: the folder came by rename with its manifest, so this is damage. Remote: an upload
            # in progress or a writer killed before its commit: no artifact (yet), and not ours to delete.
            return ("corrupt: manifest.json is missing (partial publish)" if self.is_local else "absent"), None
        try:
            self._verify(step, key, json.loads(raw))
        except (ValueError, UnicodeDecodeError) as err:
            return f"corrupt: manifest.json is unreadable ({err.__class__.__name__}: {err})", raw
        except CorruptArtifact as err:
            return f"corrupt: {err}", raw
        return "ok", raw

    def lookup(self, step: str, key: str) -> ArtifactRef | None:
        """The verified artifact, or None. A corrupt one is logged and moved out of the way."""
        status, raw = self._checked(step, key)
        if status == "ok":
            return self.ref(step, key, json.loads(raw))
        if status != "absent":
            log.warning("artifact %s/%s is %s; moving it aside and rebuilding", step, key[:12], status)
            self._quarantine(step, key, ".corrupt", raw)
        return None

    def _verify(self, step: str, key: str, manifest: dict[str, Any]) -> None:
        try:
            folder = self._path(*self._files_at(step, key, manifest))
            files = {name: (int(entry["size"]), entry["sha256"]) for name, entry in manifest["files"].items()}
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise CorruptArtifact(f"manifest.json is unreadable ({err.__class__.__name__}: {err})") from None
        for name, (size, sha256) in files.items():
            self._verify_file(self.fs, f"{folder}/{name}", name, size, sha256)

    def _verify_file(self, fs: fsspec.AbstractFileSystem, path: str, name: str, size: int, sha256: str) -> None:
        try:
            found = fs.size(path)
        except FileNotFoundError:
            raise CorruptArtifact(f"{name} is missing") from None
        if found != size:
            raise CorruptArtifact(f"{name} has {found} bytes, manifest says {size}")
        if self.verify == "sha256" and _sha256(fs, path) != sha256:
            raise CorruptArtifact(f"{name} does not match its sha256")

    def supersede(self, step: str, key: str) -> None:
        """Move a valid artifact out of the way before it is rebuilt (kept under `.superseded/`)."""
        self._quarantine(step, key, ".superseded")

    def _quarantine(self, step: str, key: str, folder_name: str, judged: bytes | None = None) -> None:
        """Local: move the folder aside. Remote: uncommit (the manifest `judged` bad, if given, and only it)."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        aside = f"{step}-{key}-{stamp}-{uuid.uuid4().hex[:6]}"
        if self.is_local:
            target = Path(self.root, folder_name, aside)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(self._path(step, key), target)
                log.warning("moved artifact %s/%s to %s", step, key[:12], target)
            except FileNotFoundError:
                pass  # another process moved or replaced it first
            return
        # Only the manifest goes (copied aside); its attempt's files stay where they are, and an
        # attempt being uploaded by another writer is never touched.
        path = self._path(step, key, MANIFEST)
        try:
            current = self.fs.cat_file(path)
        except FileNotFoundError:
            return
        if judged is not None and current != judged:
            return  # republished since it was checked: not the one found bad
        self.fs.pipe_file(self._path(folder_name, f"{aside}.json"), current)
        self.fs.rm_file(path)
        log.warning("uncommitted artifact %s/%s (its manifest is now %s/%s.json)", step, key[:12], folder_name, aside)

    def local_dir(self, ref: ArtifactRef, cache_dir: str | None = None) -> Path:
        """A local folder with the artifact's files (the folder itself on a local store).

        From a remote store: downloaded once per published attempt into `cache_dir`, each file
        checked against the manifest, the manifest written last (a folder without it is partial).
        """
        if self.is_local:
            return Path(self._path(ref.step, ref.key))
        manifest = self.read_json(ref.step, ref.key, MANIFEST)
        attempt = manifest.get("files_at", "").rsplit("/", 1)[-1] or "flat"
        target = Path(cache_dir or Path(tempfile.gettempdir()) / "orca-store-cache", ref.step, ref.key, attempt)
        if (target / MANIFEST).exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{attempt}-", dir=target.parent))
        try:
            source = self._path(*self._files_at(ref.step, ref.key, manifest))
            for name, expected in manifest["files"].items():
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.fs.get_file(f"{source}/{name}", str(staging / name))
                    self._verify_file(LocalFileSystem(), str(staging / name), name, expected["size"], expected["sha256"])
                except (CorruptArtifact, FileNotFoundError) as err:
                    reason = err if isinstance(err, CorruptArtifact) else f"{name} is missing"
                    raise CorruptArtifact(f"{ref.step}/{ref.key[:12]} downloaded from {self.url()}: {reason}") from None
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            staging.chmod(0o755)
            os.rename(staging, target)
        except OSError:
            if not (target / MANIFEST).exists():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # a concurrent download won, or this one failed
        return target

    # -- writing -----------------------------------------------------------------
    @contextmanager
    def staging(self, step: str, key: str) -> Iterator[Path]:
        """A fresh local folder to write an artifact into; removed if not published."""
        if self.is_local:
            base = Path(self.root, ".staging")
            base.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix=f"{step}-{key[:12]}-", dir=base))
        else:
            folder = Path(tempfile.mkdtemp(prefix=f"orca-{step}-{key[:12]}-"))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def publish(
        self,
        step: str,
        key: str,
        components: dict[str, Any],
        staged: Path,
        rows: dict[str, int] | None = None,
        stats: dict[str, Any] | None = None,
    ) -> ArtifactRef:
        """Publish a staged folder as `<step>/<key>`; the manifest is the commit point.

        If the key is already published, the first artifact stays (same inputs, same content).
        """
        (staged / KEY_FILE).write_text(json.dumps(components, indent=2, sort_keys=True) + "\n")
        files = {
            path.relative_to(staged).as_posix(): {"size": path.stat().st_size, "sha256": file_sha256(path)}
            for path in sorted(staged.rglob("*"))
            if path.is_file() and path.name != MANIFEST
        }
        manifest = {
            "manifest_schema": MANIFEST_SCHEMA,
            "step": step,
            "key": key,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": files,
            "rows": rows or {},
            "stats": stats or {},
        }
        if not self.is_local:
            manifest["files_at"] = f"{ATTEMPTS}/{uuid.uuid4().hex}"
        canonical_json(manifest)  # stats must be plain JSON
        if self.is_local:
            (staged / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            staged.chmod(0o755)  # mkdtemp makes it private; artifacts are for everyone who reads the store
            self._publish_local(step, key, staged)
            ref = self.ref(step, key)
        else:
            ref = self._publish_remote(step, key, staged, manifest)
        log.info("published %s/%s (%d files)", step, key[:12], len(files))
        return ref

    def _publish_local(self, step: str, key: str, staged: Path) -> None:
        final = Path(self.root, step, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            try:
                os.rename(staged, final)
                staged.mkdir()  # the staging context removes this empty stand-in
                return
            except OSError:
                if not final.exists():
                    raise
            # The same key was published by someone else: same inputs, same content.
            if self.lookup(step, key) is not None:
                return
            time.sleep(0.05 * (attempt + 1))
        raise RuntimeError(f"could not publish {step}/{key}: the folder keeps reappearing corrupt")

    def _publish_remote(self, step: str, key: str, staged: Path, manifest: dict[str, Any]) -> ArtifactRef:
        ref = self._upload_and_commit(step, key, staged, manifest)
        self._sweep_attempts(step, key, keep=self.manifest(ref).get("files_at", ""))
        return ref

    def _upload_and_commit(self, step: str, key: str, staged: Path, manifest: dict[str, Any]) -> ArtifactRef:
        if (existing := self.lookup(step, key)) is not None:
            return existing
        attempt = self._path(step, key, manifest["files_at"])
        for name in manifest["files"]:
            self.fs.put_file(str(staged / name), f"{attempt}/{name}")
        body = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        for _ in range(3):
            if self._commit(self._path(step, key, MANIFEST), body, manifest["files_at"]):
                return self.ref(step, key, manifest)
            winner = self.lookup(step, key)  # a corrupt winner is uncommitted here, and this one tries again
            if winner is not None:
                self.fs.rm(attempt, recursive=True)  # ours alone: the standing manifest names another attempt
                log.info("%s/%s was published by another writer first; using theirs", step, key[:12])
                return winner
        raise RuntimeError(f"could not publish {step}/{key}: its manifest keeps reappearing corrupt")

    def _sweep_attempts(self, step: str, key: str, keep: str) -> None:
        """Remove the key's attempts (but `keep`, the standing one) whose newest object is older than
        ABANDONED_ATTEMPT_S: killed writers' uploads. One being uploaded now is younger, and stays."""
        folder = self._path(step, key, ATTEMPTS)
        self.fs.invalidate_cache(folder)
        try:
            attempts = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return
        now = time.time()
        for attempt in attempts:
            if attempt.rstrip("/").endswith(keep.rsplit("/", 1)[-1]):
                continue
            objects = self.fs.find(attempt, detail=True).values()
            times = [_modified(info) for info in objects]
            if times and now - max(times) > ABANDONED_ATTEMPT_S:
                self.fs.rm(attempt, recursive=True)
                log.info("removed abandoned upload %s", attempt)

    def _commit(self, path: str, body: bytes, files_at: str) -> bool:
        """Write the manifest unless one exists; True when the standing manifest is ours."""
        try:
            self.fs.pipe_file(path, body, mode="create")  # S3: PUT with If-None-Match: *
        except FileExistsError:
            return False
        except OSError as err:
            if _precondition_failed(err):
                return False
            raise
        try:  # read back: a server that ignores the condition overwrote instead (last writer wins)
            return json.loads(self.fs.cat_file(path)).get("files_at") == files_at
        except FileNotFoundError:
            return False


def _precondition_failed(err: OSError) -> bool:
    """HTTP 412 from a conditional put (s3fs reports it as a plain OSError when the server omits `Condition`)."""
    response = getattr(err.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") in ("PreconditionFailed", "412") or \
        response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412


def _modified(info: dict[str, Any]) -> float:
    """An object's modification time (epoch seconds) from an fsspec info dict (S3: LastModified)."""
    value = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
    return value.timestamp() if isinstance(value, datetime) else float(value or 0.0)


def _sha256(fs: fsspec.AbstractFileSystem, path: str) -> str:
    if isinstance(fs, LocalFileSystem):
        return file_sha256(path)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
