"""Where cached users live: SQLite embedded by default, MongoDB when MONGODB_URL is set."""

from __future__ import annotations

from app.config import Settings
from app.store.base import UserStore
from app.store.sqlite import SqliteUserStore


def create_store(settings: Settings) -> UserStore:
    """The store the settings ask for; nothing is connected until `open()`."""
    if settings.mongodb_url is not None:
        from pymongo import AsyncMongoClient

        from app.store.mongo import MongoUserStore

        timeout_ms = int(settings.store_timeout_s * 1000)
        client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
            settings.mongodb_url.get_secret_value(),
            tz_aware=True,
            serverSelectionTimeoutMS=timeout_ms,
            connectTimeoutMS=timeout_ms,
        )
        return MongoUserStore(
            client, database=settings.database_name, timeout_s=settings.store_timeout_s
        )
    return SqliteUserStore(settings.sqlite_path, timeout_s=settings.store_timeout_s)


__all__ = ["SqliteUserStore", "UserStore", "create_store"]
