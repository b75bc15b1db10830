"""Rule filters: cheap per-record checks, each with its own drop reason."""
