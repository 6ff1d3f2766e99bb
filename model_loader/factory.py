"""From settings to the engine this worker runs: each engine loads its own model."""

from core.settings import Settings
from model_loader.contract import Engine, FlushPolicy


def make_engine(settings: Settings) -> Engine:
    """ENGINE picks the engine; with transformers, one slot runs `generate` with every sampling
    option, and more batch their decoding steps with fewer (no seed, no repetition penalty)."""
    flush = FlushPolicy(every_tokens=settings.stream_flush_tokens, every_s=settings.stream_flush_ms / 1000)
    if settings.engine == "llamacpp":
        from model_loader.llamacpp import LlamaCppEngine

        return LlamaCppEngine(settings, flush)
    if settings.engine == "vllm":
        from model_loader.vllm import VllmEngine

        return VllmEngine(settings, flush)
    from model_loader.loader import load_model
    from model_loader.source import model_dir
    from prompts import context_window

    loaded = load_model(settings)
    context = settings.usable_context(context_window(model_dir(settings), settings.context_window))
    if settings.worker_slots == 1:
        from model_loader.sequential import SequentialEngine

        return SequentialEngine(loaded, flush, context)
    from model_loader.batching import BatchingEngine

    return BatchingEngine(loaded, flush, settings, context)
