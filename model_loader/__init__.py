"""Weights, quantization and the generation engines.

`contract` is what a worker and an engine exchange (no torch); `factory` makes the engine
ENGINE names; `sink` turns any engine's tokens into chunks; `source` finds the model's files
without torch (the API uses it for the tokenizer), and `gguf_convert` reads folders out of a
GGUF. The engines: `llamacpp` and `vllm` supervise their servers (`engine_server`) over HTTP;
`sequential` and `batching` run transformers in this process on what `loader` loads.
"""
