"""DSIR: data selection with importance resampling over hashed n-gram features (Xie et al. 2023).

The pure, distributable core lives in :mod:`operators.dsir.core`; see its docstring for the map and
reduce stages and what each emits.
"""

from operators.dsir.core import (
    NUM_BUCKETS,
    TOKEN_PATTERN,
    Candidates,
    DSIRModel,
    HashedFeatures,
    dsir_select,
    fit_model,
    gumbel_keys,
    hashed_kl,
    hashed_ngram_counts,
    kl_reduction,
    log_importance_weights,
    merge_top_k,
    shard_candidates,
    tokenize,
    top_k,
)

__all__ = [
    "NUM_BUCKETS",
    "TOKEN_PATTERN",
    "Candidates",
    "DSIRModel",
    "HashedFeatures",
    "dsir_select",
    "fit_model",
    "gumbel_keys",
    "hashed_kl",
    "hashed_ngram_counts",
    "kl_reduction",
    "log_importance_weights",
    "merge_top_k",
    "shard_candidates",
    "tokenize",
    "top_k",
]
