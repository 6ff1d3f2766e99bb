"""OpenAI's Files API: the files batches read (and, later, write)."""
