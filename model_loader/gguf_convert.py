"""Hugging Face folders read out of a GGUF file: the tokenizer alone, or the whole model.

The tokenizer and config.json take seconds and are all the API and a llama.cpp worker need.
The weights (dequantized to fp32 and saved as safetensors: 538 MB for the embedded model) are
for transformers, whose bitsandbytes cannot quantize a GGUF load, and for vLLM. A file lock and
an atomic rename make it safe when several workers (and the API) start at once.

Run as `python -m model_loader.gguf_convert {tokenizer|weights} GGUF TARGET`.
"""

import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)


def ensure_converted(gguf: Path, target: Path, weights: bool) -> Path:
    """Write `target` unless another process already did."""
    marker = "config.json" if weights else "tokenizer.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / marker).exists():
            return target
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            _convert(gguf, Path(scratch) / "out", weights)
            shutil.move(str(Path(scratch) / "out"), target)
        log.info("read %s out of %s into %s in %.1f s", marker, gguf.name, target, time.perf_counter() - started)
    return target


def _convert(gguf: Path, out: Path, weights: bool) -> None:
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out)
    if not weights:
        AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
        return
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    model.save_pretrained(out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    what, gguf_file, target_dir = sys.argv[1:4]
    ensure_converted(Path(gguf_file), Path(target_dir), weights=what == "weights")
