"""Identifier rules shared by every flow. A thing id is an MQTT topic level, a certificate CN and
an MQTT client-id prefix at once, so it may not contain '/', '+', '#', ':' or spaces."""

from __future__ import annotations

import re
import time
import uuid

from bridge.core.errors import Invalid

# 64: the most an X.509 common name may hold (the thing id is the CN).
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
# Application client ids are "app:<name>[:suffix]"; a thing called "app" would shadow them.
RESERVED_THING_IDS = frozenset({"app"})


def new_id() -> str:
    return str(uuid.uuid4())


def check_thing_id(value: str) -> str:
    if not _ID.fullmatch(value) or value in RESERVED_THING_IDS:
        raise Invalid(
            "flthingspk must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return value


def check_name(value: str, what: str) -> str:
    if not _ID.fullmatch(value):
        raise Invalid(f"{what} must be 1-64 characters of letters, digits, '.', '_' or '-'")
    return value


def check_username(value: str) -> str:
    if not _USERNAME.fullmatch(value):
        raise Invalid("username must be 1-128 characters of letters, digits and . _ @ + -")
    return value


def now() -> float:
    return time.time()


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
