"""The Upgrader V2 dialect's JSON shapes, with the document's field names. Requests are decoded
by these models (wrong types and unknown fields: 400) and handed to bridge/core/upgrades/ as
plain JSON, which checks values again (dates, references); answers are the core's records
converted to these models."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from bridge.core import upgrades
from bridge.core.rollouts import MAX_WAVE_TIMEOUT, MAX_WAVES
from bridge.http.common.models import Count, IsoTime, Model, OpenModel

Text = Annotated[str, Meta(max_length=upgrades.MAX_TEXT)]
Key = Annotated[str, Meta(min_length=1, max_length=256)]
VersionStatus = Literal["OK", "REQUIRED", "RECOMMENDED"]
Priority = Annotated[
    Literal[upgrades.PRIORITIES + tuple(upgrades.PRIORITY_ALIASES)],  # type: ignore[valid-type]
    Meta(
        description="the enum; High, Medium and Low are accepted for FORCED, STANDBY and MANUAL and stored as those"
    ),
]
UpgradeType = Literal[upgrades.UPGRADE_TYPES]  # type: ignore[valid-type]
ResultStatus = Literal[upgrades.RESULT_STATUSES]  # type: ignore[valid-type]
Items = Meta(max_length=upgrades.MAX_ITEMS)


# ---- paths -------------------------------------------------------------------------------------
class ProfilePath(Model):
    rolloutProfileId: Key


class AccountPath(Model):
    rolloutProfileId: Key
    accountId: Key


class AccountDevicePath(Model):
    rolloutProfileId: Key
    accountId: Key
    deviceId: Key


class SoftwarePath(Model):
    softwareName: Key


class VersionPath(Model):
    softwareName: Key
    versionNumber: Key


class DevicePath(Model):
    deviceId: Annotated[Key, Meta(description="a thing id or its regId")]


class RolloutPath(Model):
    rolloutId: Key


# ---- queries -----------------------------------------------------------------------------------
class PageParams(OpenModel):
    """CATALOG 001: no limit = every record; offset skips that many, else page (1-based) skips
    (page-1)*limit."""

    limit: Annotated[int, Meta(ge=1, le=10**9, description="records per page")] | None = None
    page: Annotated[int, Meta(ge=1, le=10**9, description="1-based page number")] | None = None
    offset: Annotated[int, Meta(ge=0, le=10**9, description="records to skip")] | None = None


class ListParams(PageParams):
    filter: (
        Annotated[
            str,
            Meta(description='a JSON object, field -> value, exact match of all: {"name":"Gravity_ION"}'),
        ]
        | None
    ) = None
    fields: (
        Annotated[str, Meta(description='a JSON array of the fields to return (id always): ["id","name"]')]
        | None
    ) = None
    sort: (
        Annotated[str, Meta(description="comma-separated field names, - before one for descending")] | None
    ) = None


# ---- the catalog -------------------------------------------------------------------------------
class Dependency(Model):
    """Dependency / SoftwareVersionRef."""

    softwareName: Annotated[Key, Meta(description="the name (or id) of a Software")]
    versionNumber: Key
    name: Key | UnsetType = UNSET


class _Release(Model):
    """A version's fields but its number (which the path of a version PUT names)."""

    releaseDate: Annotated[IsoTime, Meta(description="RFC 3339; the latest release is offered")]
    status: VersionStatus
    downloadUrl: Annotated[str, Meta(max_length=2048)]
    priority: Priority | UnsetType = UNSET
    releaseNote: Text | UnsetType = UNSET
    eULA: Annotated[str, Meta(max_length=upgrades.MAX_TEXT * 16)] | UnsetType = UNSET
    rolloutProfiles: Annotated[list[Key], Items] | UnsetType = UNSET
    dependencies: Annotated[list[Dependency], Items] | UnsetType = UNSET


class Version(_Release, kw_only=True):
    versionNumber: Key


class VersionUpdate(_Release, kw_only=True):
    """A version PUT: the path names the version (a body versionNumber must be the same)."""

    versionNumber: Key | UnsetType = UNSET


class Software(Model):
    name: Annotated[Key, Meta(description="unique per operator; the path's softwareName")]
    id: Annotated[Key, Meta(description="given, or generated on create")] | UnsetType = UNSET
    description: Text | UnsetType = UNSET
    deviceTypes: Annotated[list[Key], Items] | UnsetType = UNSET
    upgradeType: UpgradeType | UnsetType = UNSET
    versions: Annotated[list[Version], Items] | UnsetType = UNSET


class RolloutProfile(Model):
    id: Annotated[Key, Meta(description="given, or generated on create")] | UnsetType = UNSET
    name: Key | UnsetType = UNSET
    description: Text | UnsetType = UNSET
    softwareVersions: Annotated[list[Dependency], Items] | UnsetType = UNSET


class Device(Model):
    id: Annotated[Key, Meta(description="a thing id or its regId")]
    type: Key


class Account(Model):
    id: Key | UnsetType = UNSET
    rolloutProfileId: Key | UnsetType = UNSET
    devices: Annotated[list[Device], Items] | UnsetType = UNSET


class DeviceList(Model):
    deviceList: Annotated[list[Device], Items]


class DeviceIdList(Model):
    deviceIdList: Annotated[list[Key], Items]


class DeviceRef(Model):
    """The document's body of the single-device add and remove; the path names the device."""

    id: Key | UnsetType = UNSET
    type: Key | UnsetType = UNSET


# ---- answers -----------------------------------------------------------------------------------
class Created(Model):
    id: str


class PutResponse(Model):
    matchedCount: Count
    modifiedCount: Count


class DevicesAdded(PutResponse):
    created_id: (
        Annotated[str, Meta(description="the account's id, when this call created it")] | UnsetType
    ) = msgspec.field(default=UNSET, name="_id")


class DeleteResponse(Model):
    deletedCount: Count


class Accepted(Model):
    message: str


def _listing(name: str, field: str, item: type) -> type[Model]:
    """A list answer: totalRecords (before paging) and the records, projected by `fields` (so
    every field of an item but id may be left out)."""
    fields = [
        (f, t if f == "id" else (t | UnsetType), UNSET if f != "id" else msgspec.NODEFAULT)
        for f, t in _item_fields(item)
    ]
    projected = msgspec.defstruct(f"{item.__name__}Record", fields, bases=(Model,), kw_only=True)
    return msgspec.defstruct(name, [("totalRecords", Count), (field, list[projected])], bases=(Model,))


def _item_fields(item: type) -> list[tuple[str, Any]]:
    hints = msgspec.structs.fields(item)
    return [(f.encode_name, f.type) for f in hints]


class StoredVersion(Version):
    """A version as answered: the priority is the enum."""

    priority: Literal[upgrades.PRIORITIES] | UnsetType = UNSET  # type: ignore[valid-type]


class StoredSoftware(Software, kw_only=True):
    id: str
    versions: list[StoredVersion]


class StoredProfile(RolloutProfile, kw_only=True):
    id: str
    softwareVersions: list[Dependency]


class StoredAccount(Account, kw_only=True):
    id: str
    rolloutProfileId: str
    devices: list[Device]


SoftwareList = _listing("SoftwareList", "softwareList", StoredSoftware)
RolloutProfileList = _listing("RolloutProfileList", "rolloutProfileList", StoredProfile)
AccountList = _listing("AccountList", "accountList", StoredAccount)


class DependencyList(Model):
    totalRecords: Count
    dependencyList: list[Dependency]


# ---- device side -------------------------------------------------------------------------------
class CheckRequest(OpenModel):
    name: Annotated[Key, Meta(description="the software's name")]
    version: Annotated[Key, Meta(description="the version the device runs")]


class CheckResponse(Model):
    name: str
    status: VersionStatus
    version: Annotated[str, Meta(description="the offered version; the supplied one when OK")]
    downloadUrl: str
    dependencies: list[Dependency]


class CurrentVersion(OpenModel):
    softwareName: Key
    currentVersionNumber: Key


class CurrentVersionNumbers(OpenModel):
    currentVersionNumbers: Annotated[list[CurrentVersion], Items]


class UpgradeResult(OpenModel):
    softwareName: Key
    versionNumber: Key
    status: ResultStatus
    errorCode: (
        Annotated[str, Meta(max_length=256, description='the device\'s own code, e.g. "sdp error"')]
        | UnsetType
    ) = UNSET
    message: Text | UnsetType = UNSET


class UpgradeResults(OpenModel):
    currentVersionsUpgradeResult: Annotated[list[UpgradeResult], Items]


class StoredResult(Model):
    softwareName: str
    versionNumber: str
    status: ResultStatus
    timestamp: IsoTime
    transport: Literal["http", "mqtt"]
    errorCode: str | UnsetType = UNSET
    message: str | UnsetType = UNSET
    clientToken: Annotated[str, Meta(description="the Client-Token header sent with it")] | UnsetType = UNSET


class ResultList(Model):
    totalRecords: Count
    upgradeResultList: list[StoredResult]


# ---- staged rollouts (extension) ---------------------------------------------------------------
class NewRollout(Model):
    softwareName: Key
    versionNumber: Key
    rolloutProfileId: Key
    waves: Annotated[
        list[Annotated[float, Meta(gt=0, le=100)]],
        Meta(
            min_length=1,
            max_length=MAX_WAVES,
            description="increasing cumulative percentages of the profile's devices, the last 100",
        ),
    ]
    errorThreshold: Annotated[
        float, Meta(ge=0, le=1, description="(FAILED + ABORTED) / reported above it stops")
    ]
    waveTimeout: Annotated[float, Meta(gt=0, le=MAX_WAVE_TIMEOUT, description="seconds a wave may take")]


class RolloutCounts(Model):
    targeted: Count
    offered: Count
    succeeded: Count
    failed: Count
    pending: Count


class Rollout(Model):
    id: str
    softwareName: str
    versionNumber: str
    rolloutProfileId: str
    waves: list[float]
    errorThreshold: float
    waveTimeout: float
    state: Literal["running", "paused", "stopped", "completed"]
    wave: Annotated[int, Meta(ge=1, description="the wave released last (1-based)")]
    reason: str | None
    counts: RolloutCounts
    created: IsoTime
    updated: IsoTime


RolloutList = _listing("RolloutList", "rolloutList", Rollout)


def body(model: msgspec.Struct) -> Any:
    """A decoded request as the plain JSON the core takes (absent fields left out)."""
    return msgspec.to_builtins(model)
