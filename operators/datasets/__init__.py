"""Dataset versions: immutable `datasets/<name>/v<NNNN>/` folders under the data root, a `LATEST` pointer moved
by compare-and-swap, a Hugging Face dataset card with lineage, streamed id diffs, pins and retention.

`versions` is the registry (publish, list, show, pin, retain), `card` renders the README, `diff` compares two
versions' id indexes. Every commit goes through `operators.core.storage` (`commit_if_absent`, `compare_and_swap`).
"""
