"""Alembic migrations of the service database; `prefix-rft init` applies them."""
