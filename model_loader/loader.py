"""The transformers engines' model: settings to a loaded (model, tokenizer) with the chosen quantization,
and what both of those engines read off it (end-of-sequence ids, decoding, memory)."""

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from core.settings import Settings
from model_loader.contract import EngineMemory
from model_loader.source import model_dir, model_name

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    device: torch.device
    weight_bytes: int
    load_s: float


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DEVICE=cuda but no CUDA device is visible; use DEVICE=auto or cpu")
    return torch.device(setting)


def resolved_quantization(quantization: str, device: torch.device) -> str:
    """"auto" is NF4 on CUDA, where it pays, and none on the CPU, where bitsandbytes has no kernel
    and NF4 ran at 0.37x of fp32 here."""
    if quantization == "auto":
        return "nf4" if device.type == "cuda" else "none"
    return quantization


def quantization_config(quantization: str, device: torch.device) -> BitsAndBytesConfig | None:
    """NF4 with double quantization; compute in bf16 on GPU, fp32 on CPU."""
    quantization = resolved_quantization(quantization, device)
    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_model(settings: Settings) -> LoadedModel:
    """Load once per worker process; logs how long it took and how much memory the weights use."""
    started = time.perf_counter()
    device = pick_device(settings.device)
    folder = model_dir(settings)
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=dtype,
        device_map=device.type,
        quantization_config=quantization_config(settings.quantization, device),
        token=token,
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, token=token)
    if device.type == "cuda":
        torch.cuda.synchronize()
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=model_name(settings),
        device=device,
        weight_bytes=model.get_memory_footprint(),
        load_s=time.perf_counter() - started,
    )
    log.info(
        "loaded %s (%s) on %s in %.1f s, weights %.0f MB",
        loaded.name, resolved_quantization(settings.quantization, device), device, loaded.load_s,
        loaded.weight_bytes / 1e6,
    )
    return loaded


def eos_ids(loaded: LoadedModel) -> list[int]:
    eos = loaded.model.generation_config.eos_token_id
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


def decoder(loaded: LoadedModel) -> Callable[[list[int]], str]:
    return lambda ids: loaded.tokenizer.decode(ids, skip_special_tokens=True)


def memory(loaded: LoadedModel) -> EngineMemory:
    """On GPU, CUDA's peak allocation since the last reset and what it holds now; on the CPU, this
    process's peak RSS (the weights and every task's KV cache live in it)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if loaded.device.type == "cuda":
        return EngineMemory(
            device=str(loaded.device), weight_bytes=loaded.weight_bytes,
            peak_bytes=int(torch.cuda.max_memory_allocated(loaded.device)), process_rss_bytes=rss,
            gpu_bytes=int(torch.cuda.memory_reserved(loaded.device)),
        )
    return EngineMemory(device="cpu", weight_bytes=loaded.weight_bytes, peak_bytes=rss, process_rss_bytes=rss)
