"""kubellm.server: `kubellm serve`, the OpenAI-compatible API server."""
