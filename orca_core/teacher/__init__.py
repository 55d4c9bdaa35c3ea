"""Teachers: the OpenAI-compatible client, the shared rate limiter, the oracle teacher server."""
