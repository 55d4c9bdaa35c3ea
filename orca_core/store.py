"""The artifact store: `<root>/<step>/<key>/` folders, published atomically.

Each artifact folder holds the step's files plus
- `key.json`: every component of the step key (readable, enough to rebuild it),
- `manifest.json`: every file with size and sha256, row counts and stats.
  Written last: an artifact without a manifest does not exist.

The root is any fsspec URL. On a local root a step writes into a staging
folder under `<root>/.staging/` and publishing is one `rename` (atomic: a
kill at any moment leaves either no artifact or a whole one). On object
stores, which have no rename, the files go up first and the manifest last.
A cache hit needs the manifest to verify against the files; a corrupt or
partial artifact is moved aside (local) or deleted (remote), logged, and
rebuilt.

Two runs that need the same artifact at once (two flows on one store) take
turns through a per-artifact lock (`lock`): the second waits, then finds the
first one's artifact instead of building (and paying for) it again.
"""

from __future__ import annotations

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

from orca_core.keys import canonical_json, file_sha256

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
KEY_FILE = "key.json"
MANIFEST_SCHEMA = 1


class CorruptArtifact(Exception):
    """An artifact folder whose manifest is missing, unreadable, or does not match its files."""


@dataclass(frozen=True)
class ArtifactRef:
    """A small, picklable handle to a published artifact (what Prefect tasks return)."""

    step: str
    key: str
    url: str  # the artifact folder, as a URL of the store's filesystem

    def file(self, name: str) -> str:
        return f"{self.url}/{name}"


class ArtifactStore:
    def __init__(self, root: str, verify: str = "sha256"):
        self.fs, path = fsspec.core.url_to_fs(root)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = str(Path(path).resolve()) if self.is_local else path.rstrip("/")
        self.protocol = "" if self.is_local else (self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0])
        self.verify = verify

    # -- concurrency -------------------------------------------------------------
    @contextmanager
    def lock(self, step: str, key: str) -> Iterator[None]:
        """Hold the build of `<step>/<key>`; another process wanting it waits here.

        Local (and NFS/Lustre-mounted) roots use a lock file under `<root>/.locks/`; object stores
        have no locks, and there two concurrent builders both publish the same content (the last
        manifest wins), which is safe but may do the work twice.
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

    def ref(self, step: str, key: str) -> ArtifactRef:
        return ArtifactRef(step, key, self.url(step, key))

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
        with self.fs.open(self._path(step, key, name), "r") as handle:
            return json.load(handle)

    def manifest(self, ref: ArtifactRef) -> dict[str, Any]:
        return self.read_json(ref.step, ref.key, MANIFEST)

    def check(self, step: str, key: str) -> str:
        """'ok', 'absent', or 'corrupt: <reason>' — reads only, changes nothing."""
        folder = self._path(step, key)
        if not self.fs.exists(folder):
            return "absent"
        try:
            self._verify(folder)
        except CorruptArtifact as err:
            return f"corrupt: {err}"
        return "ok"

    def lookup(self, step: str, key: str) -> ArtifactRef | None:
        """The verified artifact, or None. A corrupt one is logged and moved out of the way."""
        status = self.check(step, key)
        if status == "ok":
            return self.ref(step, key)
        if status != "absent":
            log.warning("artifact %s/%s is %s; moving it aside and rebuilding", step, key[:12], status)
            self._quarantine(step, key)
        return None

    def _verify(self, folder: str) -> dict[str, Any]:
        try:
            with self.fs.open(f"{folder}/{MANIFEST}", "r") as handle:
                manifest = json.load(handle)
            files = manifest["files"]
        except FileNotFoundError:
            raise CorruptArtifact("manifest.json is missing (partial publish)") from None
        except (ValueError, KeyError, TypeError) as err:
            raise CorruptArtifact(f"manifest.json is unreadable ({err.__class__.__name__}: {err})") from None
        for name, expected in files.items():
            path = f"{folder}/{name}"
            if not self.fs.exists(path):
                raise CorruptArtifact(f"{name} is missing")
            size = self.fs.size(path)
            if size != expected["size"]:
                raise CorruptArtifact(f"{name} has {size} bytes, manifest says {expected['size']}")
            if self.verify == "sha256" and self._sha256(path) != expected["sha256"]:
                raise CorruptArtifact(f"{name} does not match its sha256")
        return manifest

    def _sha256(self, path: str) -> str:
        if self.is_local:
            return file_sha256(path)
        import hashlib

        digest = hashlib.sha256()
        with self.fs.open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        return digest.hexdigest()

    def supersede(self, step: str, key: str) -> None:
        """Move a valid artifact out of the way before it is rebuilt (kept under `.superseded/`)."""
        self._quarantine(step, key, ".superseded")

    def _quarantine(self, step: str, key: str, folder_name: str = ".corrupt") -> None:
        folder = self._path(step, key)
        if self.is_local:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
            aside = Path(self.root, folder_name, f"{step}-{key}-{stamp}-{uuid.uuid4().hex[:6]}")
            aside.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(folder, aside)
                log.warning("moved artifact %s/%s to %s", step, key[:12], aside)
            except FileNotFoundError:
                pass  # another process moved or replaced it first
        else:
            self.fs.rm(folder, recursive=True)

    def local_dir(self, ref: ArtifactRef, cache_dir: str | None = None) -> Path:
        """A local folder with the artifact's files (the folder itself on a local store)."""
        if self.is_local:
            return Path(self._path(ref.step, ref.key))
        target = Path(cache_dir or Path(tempfile.gettempdir()) / "orca-store-cache", ref.step, ref.key)
        if not (target / MANIFEST).exists():
            staging = target.with_name(f".{ref.key}-{uuid.uuid4().hex[:8]}")
            self.fs.get(self._path(ref.step, ref.key) + "/", str(staging), recursive=True)
            try:
                os.rename(staging, target)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)  # a concurrent download won
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
        """Publish a staged folder as `<step>/<key>`: key.json, then manifest.json, then one rename."""
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
        canonical_json(manifest)  # stats must be plain JSON
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        staged.chmod(0o755)  # mkdtemp makes it private; artifacts are for everyone who reads the store
        if self.is_local:
            self._publish_local(step, key, staged)
        else:
            self._publish_remote(step, key, staged, files)
        log.info("published %s/%s (%d files)", step, key[:12], len(files))
        return self.ref(step, key)

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

    def _publish_remote(self, step: str, key: str, staged: Path, files: dict[str, Any]) -> None:
        folder = self._path(step, key)
        if self.fs.exists(folder):
            self.fs.rm(folder, recursive=True)  # a partial publish; lookup already said it is not ok
        for name in files:
            self.fs.put_file(str(staged / name), f"{folder}/{name}")
        self.fs.put_file(str(staged / MANIFEST), f"{folder}/{MANIFEST}")  # last: the commit point
