"""Who answers a teacher request: the identity that request ids and the trace steps' keys carry.

A cached answer may be reused only by the same teacher. An endpoint's identity is:

- `kind` and `model` (the served name), `api_version` (Azure's API revision);
- where it is served: the host of `base_url` (lowercase, default port dropped;
  never its scheme, path, query or user info, which may hold secrets), or,
  when the recipe sets `revision` (a deployment tag), that tag INSTEAD of the
  host: moving a server (new host, same weights) while keeping the revision
  reuses its answers, and bumping the revision re-asks everything;
- for the built-in oracle (no host: it runs on a free local port each time):
  the settings that decide its answers and a digest of its code.

Nothing else: the key, rate limits, concurrency, timeouts, retries and prices
change how a request is sent or billed, not what comes back.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from orca_core.code_digest import code_components, module_file
from orca_core.keys import canonical_json, sha256_text
from orca_core.recipe.models import OracleSettings, TeacherEndpoint

# The oracle's entry module: its import closure is the oracle's code version (the step keys digest the same).
ORACLE_ENTRY = "orca_oracle.__main__"
# The oracle settings that decide its answers (latency, limits and faults only decide when and whether it answers).
ORACLE_ANSWER_SETTINGS = ("error_rate", "strategy_penalty", "explain_depth", "trace_lines", "context_window", "seed")
# Where an endpoint without a base_url is served (the official SDK's default).
DEFAULT_BASE_URLS = {"openai": "https://api.openai.com/v1"}
DEFAULT_PORTS = {"http": 80, "https": 443}


def host_of(base_url: str) -> str:
    """`host` or `host:port` of an http(s) URL (the recipe checks it is one): lowercase, the scheme's default
    port dropped, never user info or path."""
    parts = urlsplit(base_url)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname  # lowercased; IPv6 bracketed
    return host if parts.port in (None, DEFAULT_PORTS[parts.scheme]) else f"{host}:{parts.port}"


def oracle_code_version() -> str:
    """sha256 of the oracle's code (every project module its entry reaches; docstrings and comments do not count)."""
    if module_file(ORACLE_ENTRY) is None:
        raise RuntimeError(f"the oracle's code version: module {ORACLE_ENTRY} not found (identity.ORACLE_ENTRY)")
    modules = code_components([ORACLE_ENTRY])["modules"]
    return sha256_text(canonical_json(modules))


def endpoint_identity(endpoint: TeacherEndpoint) -> dict[str, Any]:
    """Who answers this endpoint's requests (see the module docstring)."""
    e = endpoint
    identity: dict[str, Any] = {"kind": e.kind, "model": e.model, "api_version": e.api_version}
    if e.revision is not None:
        identity["revision"] = e.revision
    if e.kind == "oracle":
        identity["oracle"] = (e.oracle or OracleSettings()).model_dump(mode="json", include=set(ORACLE_ANSWER_SETTINGS))
        identity["oracle_code"] = oracle_code_version()
    elif e.revision is None:
        identity["host"] = host_of(e.base_url or DEFAULT_BASE_URLS[e.kind])
    return identity


# Endpoints are frozen models: one identity per object, computed once per process (a request id is computed
# for every job at every resolve, and the oracle's code digest reads files). The object is kept with its
# digest, so an id() is never reused for another endpoint while cached.
_DIGESTS: dict[int, tuple[TeacherEndpoint, str]] = {}
_MAX_CACHED = 4096


def identity_digest(endpoint: TeacherEndpoint) -> str:
    """sha256 of `endpoint_identity`: what a request id carries of its endpoint."""
    cached = _DIGESTS.get(id(endpoint))
    if cached is not None and cached[0] is endpoint:
        return cached[1]
    digest = sha256_text(canonical_json(endpoint_identity(endpoint)))
    if len(_DIGESTS) >= _MAX_CACHED:
        _DIGESTS.clear()
    _DIGESTS[id(endpoint)] = (endpoint, digest)
    return digest


def describe(endpoint: TeacherEndpoint, role: str | None = None) -> str:
    """The endpoint in an error message: role, kind, model, where it is served and the key's variable (never the key)."""
    e = endpoint
    where = "the built-in oracle" if e.kind == "oracle" else host_of(e.base_url or DEFAULT_BASE_URLS[e.kind])
    who = f"teachers.{role} " if role else "teacher "
    key = f"the key in ${e.api_key_env}" if e.api_key_env else "no key (api_key_env is not set)"
    return f"{who}({e.kind} model {e.model!r} at {where}, {key})"
