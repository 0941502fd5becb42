"""What a store raises, the same whichever database is behind it (the core catches these, never a
driver's classes); `str()` is one line."""


class StoreError(Exception):
    """The database refused or could not do a statement."""


class IntegrityError(StoreError):
    """A constraint refused the write: a key or unique value taken, a missing referenced row."""


class OperationalError(StoreError):
    """Anything else the database reports (a locked file, a full disk, a statement it rejects)."""


class Unavailable(OperationalError):
    """The database cannot be reached (PostgreSQL: the server is down or the connection was lost):
    nothing of the statement's transaction was committed, and a later try may succeed."""
