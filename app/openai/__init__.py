"""OpenAI's API (Chat Completions, Completions, Models) on the durable queue, as a sub-application
with OpenAI's own error envelope."""
