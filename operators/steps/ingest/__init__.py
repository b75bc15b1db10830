"""Ingest step: read raw instruction corpora (JSONL or JSON arrays in ShareGPT, OpenAI, Alpaca or
Infinity-Instruct layout) into canonical conversations, quarantining what cannot be read."""
