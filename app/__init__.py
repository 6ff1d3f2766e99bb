"""The HTTP tier: validates requests, records and enqueues tasks, reports progress. Never imports torch."""
