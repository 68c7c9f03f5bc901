"""The database engine and sessions: one synchronous SQLAlchemy engine per process.

SQLite (one machine) and PostgreSQL (production) run the same code. SQLite is shared by the API
and the worker processes, so it runs in WAL mode with a busy timeout; PostgreSQL gets a pool
sized for the API's thread pool.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, MetaData, create_engine, event
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

# Alembic needs stable constraint names to alter them later (its naming.rst).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def make_engine(url: str, idle_in_transaction_seconds: float | None = None) -> Engine:
    """`idle_in_transaction_seconds`: PostgreSQL ends a session that holds a transaction open and
    idle this long, and with it the row locks it took. The worker sets its lease here: a worker
    frozen mid-transaction (SIGSTOP, a VM paused) must not keep the reaper, which skips locked
    rows, from handing its job to another worker."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _tune_sqlite)
        return engine
    # As many connections as the API's thread pool has threads (40), so no thread waits for one.
    engine = create_engine(url, pool_size=40, max_overflow=10, pool_pre_ping=True, pool_recycle=1800)
    if idle_in_transaction_seconds is not None:
        # A SET on each new connection rather than a startup option: poolers such as PgBouncer
        # refuse startup options they do not know.
        milliseconds = max(1, int(idle_in_transaction_seconds * 1000))

        def end_idle_transactions(dbapi_connection, _record) -> None:
            with dbapi_connection.cursor() as cursor:
                cursor.execute(f"SET idle_in_transaction_session_timeout = {milliseconds}")
            dbapi_connection.commit()  # or the pool's first rollback would undo the SET

        event.listen(engine, "connect", end_idle_transactions)
    return engine


IDLE_IN_TRANSACTION_TIMEOUT = "25P03"  # PostgreSQL's SQLSTATE when it ends an idle transaction


def connection_lost(exc: DBAPIError) -> bool:
    """The database went away under this transaction (restarting, failing over, or it ended an idle
    transaction): retrying on a new connection may succeed."""
    if isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated:
        return True
    return getattr(exc.orig, "sqlstate", None) == IDLE_IN_TRANSACTION_TIMEOUT


def _tune_sqlite(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer (API and worker)
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work is committed on success and rolled back on error."""
    with sessions() as session, session.begin():
        yield session
