"""What the upgrader takes: the documents' fields and limits, and the checks that turn a request
body into a spec (Invalid with the field's name otherwise)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from bridge.core.errors import Invalid

VERSION_STATUSES = ("OK", "REQUIRED", "RECOMMENDED")
PRIORITIES = ("UPGRADE_TYPE_FORCED", "UPGRADE_TYPE_STANDBY", "UPGRADE_TYPE_MANUAL")
PRIORITY_ALIASES = {"High": PRIORITIES[0], "Medium": PRIORITIES[1], "Low": PRIORITIES[2]}
UPGRADE_TYPES = ("FULLSTACK", "SYSTEMAPP")
RESULT_STATUSES = ("SUCCESS", "FAILED", "DOWNLOADED", "INITIATED", "ABORTED")
TERMINAL = ("SUCCESS", "FAILED", "ABORTED")  # a device that sent one of these has reported
MAX_TEXT = 4096
MAX_ITEMS = 1000  # list fields of one request (versions, devices, reports)
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)", re.ASCII)

SOFTWARE_FIELDS = ("id", "name", "description", "deviceTypes", "upgradeType", "versions")
VERSION_FIELDS = (
    "versionNumber",
    "releaseDate",
    "status",
    "priority",
    "releaseNote",
    "eULA",
    "downloadUrl",
    "rolloutProfiles",
    "dependencies",
)
PROFILE_FIELDS = ("id", "name", "description", "softwareVersions")
ACCOUNT_FIELDS = ("id", "rolloutProfileId", "devices")


@dataclass(frozen=True)
class Put:
    """PutResponse (`matchedCount`, `modifiedCount`); `created` when an upsert made the object."""

    matched: int
    modified: int
    created: bool = False


# ---- input -------------------------------------------------------------------------------------
def as_object(body: Any, allowed: Iterable[str], what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise Invalid(f"{what} must be a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise Invalid(f"{what}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return body


def text_field(body: Mapping[str, Any], key: str, *, required: bool = False, limit: int = 256) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise Invalid(f"{key} is required (a string)")
        return None
    if not isinstance(value, str) or (required and not value) or len(value) > limit:
        raise Invalid(
            f"{key} must be a {'non-empty ' if required else ''}string of at most {limit} characters"
        )
    return value


def choice_field(
    body: Mapping[str, Any], key: str, allowed: Iterable[str], *, required: bool = False
) -> str | None:
    value = text_field(body, key, required=required)
    if value is not None and value not in allowed:
        raise Invalid(f"{key} must be one of {', '.join(allowed)}")
    return value


def list_field(body: Mapping[str, Any], key: str, *, required: bool = False) -> list[Any]:
    value = body.get(key)
    if value is None:
        if required:
            raise Invalid(f"{key} is required (an array)")
        return []
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise Invalid(f"{key} must be an array of at most {MAX_ITEMS} items")
    return value


def strings_field(body: Mapping[str, Any], key: str) -> tuple[str, ...]:
    return tuple(text_field({key: v}, key, required=True) or "" for v in list_field(body, key))


def key_field(value: Any, what: str) -> str:
    """An id or name used to address an object (path parameters)."""
    if not isinstance(value, str) or not 1 <= len(value) <= 256:
        raise Invalid(f"{what} must be a string of 1-256 characters")
    return value


def same_as_path(body: Mapping[str, Any], key: str, path_value: str) -> None:
    """The path names the object; a body that names another one is a mistake (CATALOG 001 #12)."""
    if body.get(key) is not None and body.get(key) != path_value:
        raise Invalid(
            f"{key} in the body ({body.get(key)!r:.100}) differs from the path ({path_value!r:.100})"
        )


def release_time(value: str) -> float:
    """RFC 3339 date-time (the document's "ISO 8061") -> epoch seconds, for ordering."""
    if not _RFC3339.fullmatch(value):
        raise Invalid(
            f"releaseDate must be an RFC 3339 date-time such as 2016-04-06T13:47:59.228Z, not {value!r:.60}"
        )
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError as exc:
        raise Invalid(f"releaseDate {value!r:.60} is not a valid date-time") from exc


def priority(value: str | None) -> str | None:
    """The enum, or its legacy alias High / Medium / Low (stored as the enum)."""
    if value is None:
        return None
    value = PRIORITY_ALIASES.get(value, value)
    if value not in PRIORITIES:
        raise Invalid(f"priority must be one of {', '.join(PRIORITIES)} (or High, Medium, Low)")
    return value


@dataclass(frozen=True)
class VersionSpec:
    version_number: str
    release_date: str
    released: float
    status: str
    priority: str | None
    release_note: str | None
    eula: str | None
    download_url: str
    rollout_profiles: tuple[str, ...]
    dependencies: tuple[dict[str, str], ...]

    @classmethod
    def parse(cls, body: Any, path_version: str | None = None) -> VersionSpec:
        body = as_object(body, VERSION_FIELDS, "version")
        if path_version is not None:
            same_as_path(body, "versionNumber", path_version)
            body = {**body, "versionNumber": path_version}
        date = text_field(body, "releaseDate", required=True) or ""
        return cls(
            text_field(body, "versionNumber", required=True) or "",
            date,
            release_time(date),
            choice_field(body, "status", VERSION_STATUSES, required=True) or "",
            priority(text_field(body, "priority")),
            text_field(body, "releaseNote", limit=MAX_TEXT),
            text_field(body, "eULA", limit=MAX_TEXT * 16),
            text_field(body, "downloadUrl", required=True, limit=2048) or "",
            strings_field(body, "rolloutProfiles"),
            tuple(reference_field(d, "dependencies") for d in list_field(body, "dependencies")),
        )


def reference_field(value: Any, what: str) -> dict[str, str]:
    """A Dependency / SoftwareVersionRef: {softwareName*, name, versionNumber*}."""
    ref = as_object(value, ("softwareName", "name", "versionNumber"), f"{what}[]")
    out = {k: text_field(ref, k, required=k != "name") for k in ("softwareName", "name", "versionNumber")}
    return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class SoftwareSpec:
    id: str | None
    name: str
    description: str | None
    device_types: tuple[str, ...]
    upgrade_type: str | None
    versions: tuple[VersionSpec, ...] | None  # None: leave the versions as they are

    @classmethod
    def parse(cls, body: Any) -> SoftwareSpec:
        body = as_object(body, SOFTWARE_FIELDS, "software")
        versions = None
        if body.get("versions") is not None:
            versions = tuple(VersionSpec.parse(v) for v in list_field(body, "versions"))
            numbers = [v.version_number for v in versions]
            if len(set(numbers)) != len(numbers):
                raise Invalid("versions: each versionNumber may appear once")
        return cls(
            text_field(body, "id"),
            text_field(body, "name", required=True) or "",
            text_field(body, "description", limit=MAX_TEXT),
            strings_field(body, "deviceTypes"),
            choice_field(body, "upgradeType", UPGRADE_TYPES),
            versions,
        )


def to_json(value: Any) -> str:
    return orjson.dumps(value).decode()
