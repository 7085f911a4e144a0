"""`fdjax serve`: the OpenAI-compatible HTTP server (server), its request and response shapes
(api) and its Prometheus metrics (metrics)."""
