"""The REST API (FastAPI): HTTP only. It validates and stores; the worker trains. Never imports torch."""
