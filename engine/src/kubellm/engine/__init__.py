"""kubellm.engine: model code, paged KV cache, continuous batching and the EngineCore process."""
