"""The durable store: SQLite in WAL mode with one writer thread and a small read pool."""

from appliance.store.db import Store

__all__ = ["Store"]
