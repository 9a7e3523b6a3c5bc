"""Rows written and read around a user store, straight in its database: what an earlier
version left there, and what a save keeps."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from app.domain import UserRecord
from app.store import SqliteUserStore, UserStore
from app.store.mongo import MongoUserStore, _document
from app.store.sqlite import COLUMNS

MARKS = ", ".join("?" for _ in COLUMNS)
BEFORE_THE_JSON = """
CREATE TABLE users (
    user_id INTEGER PRIMARY KEY,
    username TEXT NOT NULL,
    display_name TEXT,
    country TEXT,
    city TEXT,
    role TEXT,
    registration_date REAL,
    avatar_url TEXT,
    created_at REAL NOT NULL,
    fetched_at REAL NOT NULL
);
CREATE INDEX users_fetched_at ON users (fetched_at);
"""
"""The users table as versions before the JSON was kept made it."""


def file_from_before_the_json(path: Path, records: Sequence[UserRecord]) -> None:
    """A SQLite file as such a version left it, holding `records`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        db.executescript(BEFORE_THE_JSON)
        db.executemany(f"INSERT INTO users VALUES ({MARKS})", records)
    db.close()


async def save_as_before_the_json(store: UserStore, record: UserRecord) -> None:
    """Store `record` as a version that kept no JSON did: its fields only."""
    if isinstance(store, SqliteUserStore):
        with sqlite3.connect(store.path) as db:
            db.execute(f"INSERT INTO users ({', '.join(COLUMNS)}) VALUES ({MARKS})", record)
        db.close()
        return
    assert isinstance(store, MongoUserStore)
    await store._users.insert_one(_document(record))


async def stored_json(store: UserStore, user_id: int) -> bytes | None:
    """The JSON kept for a user, as it is in the database (None: none kept)."""
    if isinstance(store, SqliteUserStore):
        with sqlite3.connect(store.path) as db:
            row = db.execute("SELECT json FROM users WHERE user_id = ?", (user_id,)).fetchone()
        db.close()
        return None if row is None else row[0]
    assert isinstance(store, MongoUserStore)
    document = await store._users.find_one({"user_id": user_id})
    return None if document is None or document.get("json") is None else bytes(document["json"])


async def stored_ids(path: Path, ids: list[int]) -> set[int]:
    """The ids of `ids` the SQLite file at `path` holds, read on a connection of its own."""
    store = SqliteUserStore(path)
    await store.open()
    try:
        return set(await store.get_many(ids))
    finally:
        await store.close()
