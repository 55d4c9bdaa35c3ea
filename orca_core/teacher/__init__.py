"""Teachers: the OpenAI-compatible client, the shared rate limiter, the fan-out (the oracle server: `orca_oracle`)."""
