"""Model load time, tokens/s and weight footprint of the embedded model, NF4 against fp32.

Each figure is the median of several runs; both quantizations are measured in this one run so
their ratio is side by side. Run: `python -m bench.model [--runs 5 --tokens 128]`.
"""

import argparse
import platform
import statistics
import time

import torch

from core.settings import get_settings
from model_loader.loader import LoadedModel, load_model

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def tokens_per_second(loaded: LoadedModel, tokens: int) -> float:
    ids = loaded.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    ids = ids.to(loaded.device)
    started = time.perf_counter()
    with torch.inference_mode():
        loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=tokens, min_new_tokens=tokens)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - started)


def measure(quantization: str, runs: int, tokens: int) -> dict[str, float]:
    settings = get_settings().model_copy(update={"quantization": quantization})
    load_times, loaded = [], None
    for _ in range(runs):
        del loaded
        loaded = load_model(settings)
        load_times.append(loaded.load_s)
    assert loaded is not None
    tokens_per_second(loaded, 8)  # warm-up, left out
    speeds = [tokens_per_second(loaded, tokens) for _ in range(runs)]
    return {"load_s": statistics.median(load_times), "tok_s": statistics.median(speeds), "mb": loaded.weight_bytes / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    results = {q: measure(q, args.runs, args.tokens) for q in ("none", "nf4")}
    fp32, nf4 = results["none"], results["nf4"]
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"device {get_settings().device}; medians of {args.runs} runs, {args.tokens} new tokens, greedy")
    print(f"| {'':26} | {'fp32':>8} | {'nf4':>8} | {'nf4/fp32':>8} |")
    print(f"|{'-' * 28}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    for label, key in (("load time (s)", "load_s"), ("generate tokens/s", "tok_s"), ("weight footprint (MB)", "mb")):
        print(f"| {label:26} | {fp32[key]:8.2f} | {nf4[key]:8.2f} | {nf4[key] / fp32[key]:8.2f} |")


if __name__ == "__main__":
    main()
