"""Serving a model: an OpenAI-compatible HTTP API and a web chat page (`server.py`), generation in one
worker thread (`engine.py`), request checking (`api.py`)."""
