"""Celery workers: thin tasks that call service.jobs."""
