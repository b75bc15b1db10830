"""Deduplication steps: exact (normalized-text hashes) and near-duplicate (MinHash LSH)."""
