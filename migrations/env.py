"""Alembic environment: the URL comes from the service settings, the schema from service.tables."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from service import tables  # noqa: F401  (registers the tables on Base.metadata)
from service.db import Base, make_engine
from service.settings import Settings

target_metadata = Base.metadata


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


url = context.config.get_main_option("sqlalchemy.url") or Settings().database_url
if context.is_offline_mode():
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    connectable = context.config.attributes.get("connection")
    if connectable is not None:
        run_migrations(connectable)
    else:
        engine = make_engine(url)
        with engine.connect() as connection:
            run_migrations(connection)
        engine.dispose()
