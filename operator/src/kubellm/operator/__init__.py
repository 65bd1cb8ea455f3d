"""kubellm.operator: reconciles LLMServer resources (issue 4)."""
