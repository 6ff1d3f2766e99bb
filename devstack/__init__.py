"""Local process orchestration: a real redis-server, a worker and the API (`make run`, tests)."""
