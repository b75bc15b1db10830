"""LLM layer: one interface, three backends, a result cache, versioned prompts."""
