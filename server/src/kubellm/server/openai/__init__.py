"""The OpenAI-compatible API: request/response models (`protocol`), request checks that need
server state (`validate`), engine fan-out and detokenization (`generate`), and the serving logic
of /v1/completions (`completions`) and /v1/chat/completions (`chat`)."""
