"""SQLite persistence: the schema as versioned migrations, one writer thread that commits in groups, pooled readers."""

from bridge.store.db import Store

__all__ = ["Store"]
