"""Celery workers: each process loads one copy of the model and runs generation tasks."""
