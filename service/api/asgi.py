"""ASGI entry point for uvicorn: the app built from the environment's settings."""

from __future__ import annotations

from service.api.app import create_app

app = create_app()
