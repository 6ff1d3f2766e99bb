"""Loading the embedded model with each quantization on the CPU, and generating with the engine."""

from pathlib import Path

import pytest

from core.settings import Settings
from model_loader.contract import FlushPolicy, SamplingParams
from model_loader.loader import LoadedModel, load_model, quantization_config
from model_loader.sequential import SequentialEngine
from tests.conftest import MODEL_CACHE

GREEDY = SamplingParams(max_new_tokens=24, temperature=0, top_p=1, top_k=0, repetition_penalty=1.0)


def load(quantization: str) -> LoadedModel:
    return load_model(Settings(model_cache_dir=MODEL_CACHE, quantization=quantization, device="cpu"))


def paris_prompt(loaded: LoadedModel) -> list[int]:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    return loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


@pytest.fixture(scope="module")
def nf4(model_dir: Path) -> LoadedModel:
    return load("nf4")


def test_nf4_quantizes_linear_layers_to_4_bit(nf4: LoadedModel) -> None:
    import bitsandbytes as bnb

    layers = [m for m in nf4.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 30 * 7  # q, k, v, o, gate, up, down in each of the 30 blocks
    assert layers[0].weight.quant_type == "nf4"
    assert nf4.device.type == "cpu"


def test_nf4_is_smaller_than_fp32(nf4: LoadedModel) -> None:
    fp32 = load("none")
    assert nf4.weight_bytes < 0.5 * fp32.weight_bytes


def test_nf4_generates_paris_on_the_cpu(nf4: LoadedModel) -> None:
    chunks: list[str] = []
    outcome = SequentialEngine(nf4, FlushPolicy(every_tokens=2), context_tokens=8192).generate(
        paris_prompt(nf4), GREEDY, lambda text, *_: chunks.append(text)
    )
    assert "Paris" in outcome.text
    assert "".join(chunks) == outcome.text
    assert outcome.prompt_tokens == len(paris_prompt(nf4)) and outcome.completion_tokens > 0


def test_quantization_settings_map_to_bitsandbytes() -> None:
    import torch

    config = quantization_config("nf4", torch.device("cpu"))
    assert config is not None and config.load_in_4bit and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_compute_dtype == torch.float32
    assert quantization_config("int8", torch.device("cpu")).load_in_8bit  # type: ignore[union-attr]
    assert quantization_config("none", torch.device("cpu")) is None
