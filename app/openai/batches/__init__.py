"""OpenAI's Batch API: a file of requests run as background tasks on the durable queue."""
