"""Near-duplicate detection: MinHash signatures, LSH band keys, candidate links, components.

Pure functions over Arrow arrays and numpy matrices (no I/O, no Airflow), shaped for a distributed
map (signatures and band rows per shard) -> shuffle (by band bucket) -> reduce (links, components)
step. See ``operators.dedup.minhash`` for the algorithm and the contracts between the stages.
"""

from operators.dedup.minhash import (
    ALGORITHM_VERSION,
    EMPTY_BAND_HASH,
    EMPTY_VALUE,
    MinHashParams,
    band_hashes,
    band_rows,
    candidate_pairs,
    components_from_links,
    duplicate_components,
    empty_signatures,
    estimated_jaccard,
    jaccard_verifier,
    minhash_signatures,
    near_duplicate_drops,
    normalize,
    optimal_bands,
    permutations,
    shingle_hashes,
    shingles,
    signature_verifier,
    signatures_from_token_hashes,
    token_hashes32,
    tokenize,
)
from operators.dedup.unionfind import choose_keepers, connected_components

__all__ = [
    "ALGORITHM_VERSION",
    "EMPTY_BAND_HASH",
    "EMPTY_VALUE",
    "MinHashParams",
    "band_hashes",
    "band_rows",
    "candidate_pairs",
    "choose_keepers",
    "components_from_links",
    "connected_components",
    "duplicate_components",
    "empty_signatures",
    "estimated_jaccard",
    "jaccard_verifier",
    "minhash_signatures",
    "near_duplicate_drops",
    "normalize",
    "optimal_bands",
    "permutations",
    "shingle_hashes",
    "shingles",
    "signature_verifier",
    "signatures_from_token_hashes",
    "token_hashes32",
    "tokenize",
]
