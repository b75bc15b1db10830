"""LLM backends (imported lazily by `make_backend`)."""
