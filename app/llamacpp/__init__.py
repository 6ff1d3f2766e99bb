"""llama.cpp's native server API (/completion, /tokenize, /detokenize, /props) on the durable queue."""
