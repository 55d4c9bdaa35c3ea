"""The oracle teacher: a simulated OpenAI-compatible server, the embedded default teacher.

Not part of the library: `orca_core` starts it as a subprocess
(`python -m orca_oracle CONFIG READY_FILE`, see `orca_core/teacher/runner.py`)
and talks to it over HTTP like to any provider. It serves chat completions
(OpenAI and Azure paths), `/v1/models`, the Batch API (`/v1/files`,
`/v1/batches`) and `/stats` (what was served, so tests can check that nothing
was paid for twice).

- `solver`, `reasoning`: what it answers (gold answers with real reasoning);
- `state`: per-model settings, rate-limit windows, fault draws, the counters,
  and the answer to one request body (shared by online calls and batch lines);
- `server`: the HTTP app; `batches`: the Batch API.
"""
