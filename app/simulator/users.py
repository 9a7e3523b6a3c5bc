"""Deterministic synthetic Freelancer users: the same id gives the same user in every process."""

from __future__ import annotations

import hashlib
from typing import Any

MAX_EXISTING_ID = 10**12
FIRST = (
    "amber",
    "brisk",
    "cobalt",
    "daring",
    "eager",
    "fable",
    "gentle",
    "hazel",
    "ivory",
    "jolly",
)
SECOND = (
    "falcon",
    "otter",
    "maple",
    "comet",
    "harbor",
    "lynx",
    "willow",
    "quartz",
    "robin",
    "tiger",
)
PLACES = (
    ("Australia", "au", "Sydney"),
    ("India", "in", "Bengaluru"),
    ("United States", "us", "Austin"),
    ("Philippines", "ph", "Manila"),
    ("Pakistan", "pk", "Lahore"),
    ("United Kingdom", "gb", "Leeds"),
    ("Brazil", "br", "Recife"),
    ("Germany", "de", "Leipzig"),
    ("Kenya", "ke", "Nairobi"),
    ("Canada", "ca", None),
)
LANGUAGES = ("en", "hi", "es", "pt", "de", "tl")
REGISTERED_FROM = 1_230_768_000  # 2009-01-01
REGISTERED_SPAN = 16 * 365 * 86400


def exists(user_id: int, not_found_modulus: int) -> bool:
    """Whether the simulated Freelancer has this id."""
    return 0 < user_id <= MAX_EXISTING_ID and (
        not_found_modulus <= 0 or user_id % not_found_modulus != 0
    )


def synthetic_user(user_id: int, not_found_modulus: int = 97) -> dict[str, Any] | None:
    """The user object Freelancer would return for `user_id`, or None when it does not exist."""
    if not exists(user_id, not_found_modulus):
        return None
    digest = hashlib.blake2b(user_id.to_bytes(8, "big"), digest_size=16).digest()
    username = f"{FIRST[digest[0] % 10]}{SECOND[digest[1] % 10]}{user_id}"
    country, code, city = PLACES[digest[2] % len(PLACES)]
    role = "employer" if digest[3] % 3 == 0 else "freelancer"
    avatar: str | None
    if digest[4] % 10 == 0:
        avatar = None
    elif digest[4] % 3 == 0:
        avatar = f"//cdn.example-sim.test/avatars/{user_id}.jpg"  # protocol-relative, as seen
    else:
        avatar = f"https://cdn.example-sim.test/avatars/{user_id}.jpg"
    location: dict[str, Any] = {
        "country": {
            "name": country,
            "code": code,
            "flag_url": f"/static/flags/{code}.png",
        },
        "city": city,
        "latitude": round((digest[5] - 128) / 1.5, 4),
        "longitude": round((digest[6] - 128) / 0.75, 4),
    }
    if digest[7] % 20 == 0:
        location = {"country": {"name": None, "code": None}, "city": None}
    display = f"{username[0].upper()}{username[1:]}"
    return {
        "id": user_id,
        "username": username,
        "display_name": display,
        "public_name": display,
        "role": role,
        "chosen_role": role,
        "registration_date": REGISTERED_FROM
        + int.from_bytes(digest[8:12], "big") % REGISTERED_SPAN,
        "closed": False,
        "suspended": False,
        "limited_account": False,
        "avatar": avatar,
        "avatar_large": avatar,
        "avatar_cdn": avatar,
        "primary_language": LANGUAGES[digest[12] % len(LANGUAGES)],
        "primary_currency": {"id": 1, "code": "USD", "sign": "$", "name": "US Dollar"},
        "location": location,
    }
