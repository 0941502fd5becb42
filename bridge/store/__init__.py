"""Persistence: the schema as versioned migrations, one writer thread that commits in groups, pooled
readers; on the SQLite file in data_dir (default) or on PostgreSQL (store.url)."""

from pathlib import Path

from bridge.store.db import LOCK_TIMEOUT, Store
from bridge.store.errors import IntegrityError, OperationalError, StoreError, Unavailable

__all__ = ["IntegrityError", "OperationalError", "Store", "StoreError", "Unavailable", "create"]


def create(url: str, path: Path, synchronous: str = "FULL", lock_timeout: float = LOCK_TIMEOUT) -> Store:
    """The store `url` names (config's store.url, already checked): "sqlite:" the file at `path`,
    else a PostgreSQL database (psycopg is imported only then: the postgres extra)."""
    if url == "sqlite:":
        return Store(path, synchronous, lock_timeout=lock_timeout)
    from bridge.store.postgres import PostgresStore

    return PostgresStore(url, path)
