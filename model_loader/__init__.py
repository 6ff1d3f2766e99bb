"""Weights, quantization and the generation engine.

`source` finds the model's files without torch (the API uses it for the tokenizer); `embedded`
turns the packaged GGUF into a cached folder; `loader` loads (model, tokenizer) with the chosen
quantization; `engine` generates.
"""
