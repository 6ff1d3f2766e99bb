"""What the API, the worker, the client and the tests share: settings, wire shapes, the task store."""
